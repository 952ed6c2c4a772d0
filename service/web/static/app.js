// The page at "/": sends each chosen image to /predict, /explain or /features of this same service and shows the
// answer; with "Show why" it draws the class activation map of the label the visitor clicks over the photo.
// No framework, no external request (the page's Content-Security-Policy forbids them). URLs are relative so the
// page also works when a proxy serves the service under a path prefix.
"use strict";

(() => {
  const KEY_STORAGE = "effnet-api-key";
  const CONCURRENCY = 4; // requests in flight at once; the service batches them together anyway
  const TOP_K = 5;
  const FIRST_VALUES = 8;

  const $ = (id) => document.getElementById(id);
  const els = {
    modelInfo: $("model-info"),
    modelPicker: $("model-picker"),
    modelSelect: $("model"),
    keyForm: $("key-form"),
    keyInput: $("api-key"),
    keyState: $("key-state"),
    forgetKey: $("forget-key"),
    input: $("images"),
    formats: $("formats"),
    dropZone: $("drop-zone"),
    normalize: $("normalize"),
    why: $("why"),
    rerun: $("rerun"),
    clear: $("clear"),
    progress: $("progress"),
    results: $("results"),
    template: $("card-template"),
  };

  let info = null; // the chosen model's /info answer, once read
  let served = []; // /info's "models": every model the service serves
  let chosen = ""; // the model picked in the list; "" while the service serves one (requests then name none)
  let infoReads = 0; // only the answer to the latest /info request is shown
  let entries = []; // {file, url, card, run, state: "pending" | "done" | "error", needsKey}
  let queue = [];
  let active = 0;

  // -- the API key: this tab only (sessionStorage), never the disk of a shared machine --------------------------
  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }
  let apiKey = storedKey();

  function showKeyForm(message, focus) {
    els.keyForm.hidden = false;
    if (message) els.keyState.textContent = message;
    if (focus) els.keyInput.focus();
  }

  els.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = els.keyInput.value.trim();
    if (!value) {
      els.keyState.textContent = "Enter the key first.";
      els.keyInput.focus();
      return;
    }
    apiKey = value;
    try {
      sessionStorage.setItem(KEY_STORAGE, value);
    } catch (_) {
      // Storage refused (private mode): the key still works until the page is reloaded.
    }
    els.keyInput.value = "";
    const waiting = entries.filter((entry) => entry.needsKey);
    els.keyState.textContent = waiting.length
      ? `Key kept for this tab. Sending ${plural(waiting.length, "image")} again.`
      : "Key kept for this tab.";
    waiting.forEach(enqueue);
  });

  els.forgetKey.addEventListener("click", () => {
    apiKey = "";
    try {
      sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      // nothing stored
    }
    els.keyInput.value = "";
    els.keyState.textContent = "Key forgotten.";
    els.keyInput.focus();
  });

  // -- what the service serves, and which model the images go to ------------------------------------------------
  async function loadInfo(name) {
    const read = ++infoReads;
    try {
      const response = await fetch(withModel("info", name), { cache: "no-store" });
      const data = await readJson(response);
      if (read !== infoReads) return; // another model was chosen meanwhile
      if (!response.ok) {
        els.modelInfo.textContent = `Could not read the model's description: ${errorMessage(response, data)}`;
        return;
      }
      info = data;
      showModels(data);
      showFormats(data.image_formats);
      if (data.auth_required && els.keyForm.hidden) {
        showKeyForm(apiKey ? "A key is kept for this tab." : "Enter the key before choosing images.", false);
      }
    } catch (error) {
      if (read === infoReads) els.modelInfo.textContent = `Could not reach the service: ${error.message}`;
    }
  }

  // The picker, when the service serves several models (the one /info described is selected: the default, the
  // first, or the visitor's choice), and the chosen model's facts.
  function showModels(data) {
    served = Array.isArray(data.models) ? data.models : [];
    if (served.length > 1) {
      chosen = data.model;
      const names = served.map((m) => m.name);
      const listed = Array.from(els.modelSelect.options, (o) => o.value);
      if (names.join("\n") !== listed.join("\n")) {
        els.modelSelect.replaceChildren(...served.map((m) => new Option(m.name, m.name)));
      }
      for (const option of els.modelSelect.options) {
        const entry = served.find((m) => m.name === option.value);
        option.textContent = entry.state === "ready" ? entry.name : `${entry.name} (${entry.state})`;
      }
      els.modelSelect.value = chosen;
      els.modelPicker.hidden = false;
    } else {
      chosen = "";
      els.modelPicker.hidden = true;
    }
    const entry = served.find((m) => m.name === data.model);
    const named = data.variant && data.variant !== data.model ? `${data.model} (${data.variant})` : data.model;
    const state = entry && entry.state !== "ready" ? ` Not ready: ${entry.state}.` : "";
    els.modelInfo.textContent =
      `${named}: ${data.num_classes} classes, ${data.num_features} features, ` +
      `${data.backend} on ${data.device} (${data.dtype}).${state}`;
  }

  els.modelSelect.addEventListener("change", () => {
    // Images sent from now on go to the new model at once; its facts follow when /info answers.
    chosen = els.modelSelect.value;
    els.modelInfo.textContent = `Asking the service about ${chosen}…`;
    loadInfo(chosen);
  });

  // The chosen model's number of classes: from the list until its own /info has answered.
  function numClasses() {
    const entry = served.find((m) => m.name === chosen);
    if (entry) return entry.num_classes;
    return info ? info.num_classes : TOP_K;
  }

  function withModel(url, name) {
    return name ? `${url}${url.includes("?") ? "&" : "?"}model=${encodeURIComponent(name)}` : url;
  }

  // The formats the service decodes (its /info): the hint, and what the file picker offers. Dropped files are
  // sent whatever they are; the service recognises images by their content and says so when it cannot.
  function showFormats(formats) {
    if (!Array.isArray(formats) || !formats.length) return;
    const labels = formats.map((f) => f.label);
    els.formats.textContent =
      labels.length > 1 ? `${labels.slice(0, -1).join(", ")} or ${labels[labels.length - 1]}` : labels[0];
    const accept = new Set(["image/*"]);
    for (const f of formats) for (const ext of f.extensions || []) accept.add(ext);
    els.input.accept = Array.from(accept).join(",");
  }

  // -- choosing and dropping images ---------------------------------------------------------------------------
  function mode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  document.querySelectorAll('input[name="mode"]').forEach((radio) =>
    radio.addEventListener("change", () => {
      els.normalize.disabled = mode() !== "features";
      els.why.disabled = mode() !== "predict";
    }),
  );

  els.input.addEventListener("change", () => {
    addFiles(els.input.files);
    els.input.value = ""; // choosing the same file again is a new request
  });

  // A file dropped anywhere on the page must not make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  els.dropZone.addEventListener("dragenter", () => els.dropZone.classList.add("dragging"));
  els.dropZone.addEventListener("dragover", (event) => {
    event.dataTransfer.dropEffect = "copy";
    els.dropZone.classList.add("dragging");
  });
  els.dropZone.addEventListener("dragleave", (event) => {
    if (!els.dropZone.contains(event.relatedTarget)) els.dropZone.classList.remove("dragging");
  });
  els.dropZone.addEventListener("drop", (event) => {
    els.dropZone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });

  els.rerun.addEventListener("click", () => entries.forEach(enqueue));
  els.clear.addEventListener("click", () => {
    for (const entry of entries) {
      entry.run += 1; // answers still on their way are ignored
      URL.revokeObjectURL(entry.url);
    }
    entries = [];
    queue = [];
    els.results.replaceChildren();
    updateProgress();
  });

  function addFiles(fileList) {
    for (const file of Array.from(fileList || [])) {
      const entry = { file, url: URL.createObjectURL(file), card: makeCard(file), run: 0, state: "pending" };
      entry.card.thumb.src = entry.url;
      entries.push(entry);
      els.results.append(entry.card.root);
      enqueue(entry);
    }
  }

  function makeCard(file) {
    const root = els.template.content.firstElementChild.cloneNode(true);
    const card = {
      root,
      thumb: root.querySelector(".thumb"),
      name: root.querySelector(".file-name"),
      meta: root.querySelector(".meta"),
      outcome: root.querySelector(".outcome"),
    };
    card.name.textContent = file.name || "(unnamed image)";
    card.thumb.alt = `Thumbnail of ${file.name || "the image"}`;
    card.thumb.addEventListener("error", () => card.thumb.classList.add("no-preview"));
    return card;
  }

  // -- sending ------------------------------------------------------------------------------------------------
  function enqueue(entry) {
    entry.run += 1;
    entry.state = "pending";
    entry.needsKey = false;
    entry.card.root.setAttribute("aria-busy", "true");
    entry.card.meta.textContent = `${formatBytes(entry.file.size)} · waiting`;
    entry.card.outcome.replaceChildren();
    if (!queue.includes(entry)) queue.push(entry);
    updateProgress();
    pump();
  }

  function pump() {
    while (active < CONCURRENCY && queue.length) {
      const entry = queue.shift();
      active += 1;
      send(entry, entry.run).finally(() => {
        active -= 1;
        updateProgress();
        pump();
      });
    }
  }

  async function send(entry, run) {
    const features = mode() === "features";
    const normalize = els.normalize.checked;
    const why = !features && els.why.checked; // /explain: the same top-k, and a map for each of them
    const model = chosen; // the model this image goes to, even if another is picked while it is on its way
    // At least 1: a model without a classifier (0 classes) then gets the service's own no_classifier answer.
    const topK = Math.max(1, Math.min(TOP_K, numClasses()));
    const path = features ? `features?normalize=${normalize}` : `${why ? "explain" : "predict"}?top_k=${topK}`;
    const url = withModel(path, model);
    const by = model ? ` · ${model}` : "";
    const body = new FormData();
    body.append("file", entry.file, entry.file.name || "image");
    const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
    entry.card.meta.textContent = `${formatBytes(entry.file.size)}${by} · sending`;

    const started = performance.now();
    let response;
    let data;
    try {
      response = await fetch(url, { method: "POST", body, headers, cache: "no-store" });
      data = await readJson(response);
    } catch (error) {
      if (run !== entry.run) return;
      showError(entry, `Could not reach the service: ${error.message}`, "");
      return;
    }
    const elapsed = performance.now() - started;
    if (run !== entry.run) return; // cleared or sent again meanwhile

    const requestId = response.headers.get("X-Request-ID");
    const took = `${formatMs(elapsed)}`;
    if (!response.ok) {
      const code = data && data.error && data.error.code ? ` ${data.error.code}` : "";
      const request = requestId ? ` · request ${requestId}` : "";
      const detail = `${model ? `${model} · ` : ""}HTTP ${response.status}${code} · ${took}${request}`;
      showError(entry, errorMessage(response, data), detail);
      if (response.status === 401) {
        entry.needsKey = true;
        showKeyForm(
          apiKey ? "The service refused this key; enter the right one." : "This service requires an API key.",
          true,
        );
      }
      return;
    }
    entry.state = "done";
    entry.card.root.removeAttribute("aria-busy");
    const result = data.results[0];
    if (features) {
      entry.card.meta.textContent = `${formatBytes(entry.file.size)}${by} · features in ${took}`;
      entry.card.outcome.replaceChildren(renderFeatures(data.dim, result.embedding, normalize));
    } else if (why) {
      entry.card.meta.textContent = `${formatBytes(entry.file.size)}${by} · top-${topK} and why in ${took}`;
      const figure = renderWhy(entry, result);
      entry.card.outcome.replaceChildren(renderLabels(result.top_k, figure.pick), figure.root);
      figure.pick(result.maps[0].index);
    } else {
      entry.card.meta.textContent = `${formatBytes(entry.file.size)}${by} · top-${topK} in ${took}`;
      entry.card.outcome.replaceChildren(renderLabels(result.top_k));
    }
  }

  function showError(entry, message, detail) {
    entry.state = "error";
    entry.card.root.removeAttribute("aria-busy");
    entry.card.meta.textContent = `${formatBytes(entry.file.size)}${detail ? ` · ${detail}` : ""}`;
    const p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    entry.card.outcome.replaceChildren(p);
  }

  // -- rendering ----------------------------------------------------------------------------------------------
  // pick(index): with "Show why", each label is a button that draws its class's map.
  function renderLabels(topK, pick) {
    const list = document.createElement("ol");
    list.className = "labels";
    list.setAttribute("aria-label", `Top ${topK.length} labels`);
    for (const item of topK) {
      const li = document.createElement("li");
      const label = document.createElement(pick ? "button" : "span");
      label.className = "label";
      label.textContent = item.label;
      if (pick) {
        label.type = "button";
        label.classList.add("label-pick");
        label.dataset.index = String(item.index);
        label.setAttribute("aria-pressed", "false");
        label.title = `Show where the model saw "${item.label}"`;
        label.addEventListener("click", () => pick(item.index));
      }
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = formatPercent(item.score);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true"); // the percentage says it in text
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(0, Math.min(1, item.score)) * 100}%`;
      bar.append(fill);
      li.append(label, score, bar);
      list.append(li);
    }
    return list;
  }

  // The photo on a canvas with a class's map drawn over the crop the model saw (the answer's crop box, in the
  // oriented photo's pixels; the browser draws photos in their EXIF orientation too). Outside the box the photo
  // is dimmed. The map's h x w grid is upsampled smoothly by the canvas itself.
  function renderWhy(entry, result) {
    const root = document.createElement("figure");
    root.className = "why";
    const canvas = document.createElement("canvas");
    canvas.className = "why-canvas";
    canvas.setAttribute("role", "img");
    const caption = document.createElement("figcaption");
    root.append(canvas, caption);
    const photo = new Image();
    photo.src = entry.url;
    const ready = photo.decode();

    async function pick(index) {
      const chosen = result.maps.find((m) => m.index === index);
      if (!chosen) return;
      for (const button of entry.card.outcome.querySelectorAll(".label-pick")) {
        button.setAttribute("aria-pressed", String(button.dataset.index === String(index)));
      }
      const text = `Where the model saw "${chosen.label}" (${formatPercent(chosen.score)}): red most, blue least.`;
      caption.textContent = text;
      canvas.setAttribute("aria-label", text);
      try {
        await ready;
      } catch (_) {
        caption.textContent = `${text} (This browser cannot show the photo itself.)`;
        return;
      }
      drawMap(canvas, photo, result.crop, chosen.map);
      canvas.dataset.classIndex = String(index); // drawn: what the page's test waits for
    }
    return { root, pick };
  }

  const HEAT_STOPS = [
    [0.0, [0, 0, 128]], [0.125, [0, 0, 255]], [0.375, [0, 255, 255]],
    [0.625, [255, 255, 0]], [0.875, [255, 0, 0]], [1.0, [128, 0, 0]],
  ]; // the same scale as the service's PNG overlays

  function heat(v) {
    for (let i = 1; i < HEAT_STOPS.length; i += 1) {
      const [x1, c1] = HEAT_STOPS[i];
      const [x0, c0] = HEAT_STOPS[i - 1];
      if (v <= x1) {
        const t = x1 > x0 ? (v - x0) / (x1 - x0) : 0;
        return c0.map((c, k) => Math.round(c + t * (c1[k] - c)));
      }
    }
    return HEAT_STOPS[HEAT_STOPS.length - 1][1];
  }

  function drawMap(canvas, photo, crop, grid) {
    const width = Math.min(480, photo.naturalWidth);
    const scale = width / photo.naturalWidth;
    canvas.width = Math.max(1, Math.round(width));
    canvas.height = Math.max(1, Math.round(photo.naturalHeight * scale));
    const ctx = canvas.getContext("2d");
    ctx.drawImage(photo, 0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    // The box in canvas pixels (the crop is in the photo's own pixels, which naturalWidth counts).
    const fx = canvas.width / crop.width;
    const fy = canvas.height / crop.height;
    const x = crop.left * fx;
    const y = crop.top * fy;
    const w = (crop.right - crop.left) * fx;
    const h = (crop.bottom - crop.top) * fy;
    const sx = photo.naturalWidth / crop.width;
    const sy = photo.naturalHeight / crop.height;
    ctx.drawImage(photo, crop.left * sx, crop.top * sy, (crop.right - crop.left) * sx, (crop.bottom - crop.top) * sy,
      x, y, w, h);
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    if (rows && cols) {
      const cells = document.createElement("canvas");
      cells.width = cols;
      cells.height = rows;
      const cellsCtx = cells.getContext("2d");
      const image = cellsCtx.createImageData(cols, rows);
      grid.forEach((row, i) => row.forEach((v, j) => {
        const [r, g, b] = heat(Math.max(0, Math.min(1, v)));
        image.data.set([r, g, b, 255], (i * cols + j) * 4);
      }));
      cellsCtx.putImageData(image, 0, 0);
      ctx.save();
      ctx.globalAlpha = 0.5;
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(cells, x, y, w, h);
      ctx.restore();
    }
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 2;
    ctx.strokeRect(x, y, w, h);
  }

  function renderFeatures(dim, embedding, normalized) {
    const norm = Math.sqrt(embedding.reduce((sum, v) => sum + v * v, 0));
    const first = embedding.slice(0, FIRST_VALUES).map((v) => v.toFixed(4));
    const dl = document.createElement("dl");
    dl.className = "features";
    const rows = [
      ["Dimension", String(dim)],
      [normalized ? "L2 norm (normalised)" : "L2 norm", norm.toFixed(4)],
      [`First ${first.length} values`, `[${first.join(", ")}${embedding.length > first.length ? ", …" : ""}]`],
    ];
    for (const [term, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dl.append(dt, dd);
    }
    return dl;
  }

  function updateProgress() {
    const total = entries.length;
    els.rerun.disabled = total === 0;
    els.clear.disabled = total === 0;
    if (!total) {
      els.progress.textContent = "";
      return;
    }
    const done = entries.filter((e) => e.state === "done").length;
    const failed = entries.filter((e) => e.state === "error").length;
    const pending = total - done - failed;
    const parts = [`${done} of ${plural(total, "image")} answered`];
    if (failed) parts.push(`${failed} failed`);
    if (pending) parts.push(`${pending} in progress`);
    els.progress.textContent = parts.join(", ") + ".";
  }

  // -- helpers ------------------------------------------------------------------------------------------------
  async function readJson(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  // The service's own words when it gave them (every error of the service is {"error": {"message": ...}}).
  function errorMessage(response, data) {
    if (data && data.error && typeof data.error.message === "string") return data.error.message;
    return `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function formatMs(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function formatPercent(p) {
    const value = p * 100;
    return `${value >= 10 ? value.toFixed(1) : value.toFixed(2)}%`;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  loadInfo();
})();
