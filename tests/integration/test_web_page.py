"""The page at ``/`` in a real browser (Debian's chromium driven by playwright) against real Lite0 servers.

The browser is the system one (``/usr/bin/chromium``, or ``$CHROMIUM``); playwright never downloads one.
Without chromium or playwright these tests skip, except in CI (``CI=true``), where they fail: `.ci/run`
installs chromium.

``WEB_PAGE_SCREENSHOT=docs/web_page.png`` makes the first test save the screenshot the README shows.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.components import missing_component
from tests.helpers.images import DATA
from tests.helpers.repository import B_LABELS, two_lite0_models
from tests.helpers.server import ServiceProcess

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    missing_component("playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 60_000
KEY = "web-page-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not os.access(CHROMIUM, os.X_OK):
        missing_component(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


class Tab:
    """One page in a fresh browser context, with every request and console error it made recorded."""

    def __init__(self, browser, base_url: str) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1100, "height": 900})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))

    def open(self) -> None:
        self.page.goto(self.base_url + "/")
        # /info has been read once the header names the model (or says why not). (Locator waits only: the
        # page's CSP forbids the eval that wait_for_function would need, as it should.)
        expect(self.page.locator("#model-info")).not_to_have_text(re.compile("^Asking"), timeout=WAIT_MS)

    def card(self, name: str):
        return self.page.locator("#results > li", has=self.page.locator("h3", has_text=name))

    def external_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith((self.base_url + "/", "blob:", "data:"))]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, lite0_service: ServiceProcess) -> Iterator[Tab]:
    tab = Tab(browser, lite0_service.url)
    yield tab
    tab.close()


def _predict(url: str, path: Path, headers: dict[str, str] | None = None) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{url}/predict", files={"file": (path.name, f)}, params={"top_k": 5}, headers=headers, timeout=60
        )


def _top5_shown(card) -> list[tuple[str, str]]:
    labels = card.locator(".labels li")
    return [(li.locator(".label").inner_text(), li.locator(".score").inner_text()) for li in labels.all()]


def test_a_photo_chosen_through_the_file_input_shows_the_services_top5_as_text(tab, lite0_service):
    """coffee.jpg chosen through the file input: its card shows "espresso" first, the same five labels as
    /predict in the same order with their percentages, a bar per label, a loaded thumbnail and the request's
    time; the page made no request outside the service and logged no error (no CSP violation either)."""
    tab.open()
    assert tab.page.locator("#model-info").inner_text().startswith("efficientnet-lite0:")
    assert tab.page.locator("#model-picker").is_hidden()  # one model: nothing to choose
    tab.page.get_by_label("Choose one or several images, or drop them here").set_input_files(DATA / "coffee.jpg")

    card = tab.card("coffee.jpg")
    first = card.locator(".labels li").first.locator(".label")
    first.wait_for()
    assert first.inner_text() == "espresso"

    expected = _predict(lite0_service.url, DATA / "coffee.jpg").json()["results"][0]["top_k"]
    shown = _top5_shown(card)
    assert [label for label, _ in shown] == [c["label"] for c in expected]
    for (_, percent), c in zip(shown, expected, strict=True):
        assert abs(float(percent.rstrip("%")) - 100 * c["score"]) < 0.06, (percent, c["score"])
    widths = card.locator(".labels .fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
    assert len(widths) == 5 and widths[0] > widths[1] >= widths[4] >= 0, widths
    assert card.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth") > 0
    meta = card.locator(".meta").inner_text()
    assert "top-5 in" in meta and meta.rstrip().endswith(("ms", " s")), meta
    assert tab.page.locator("#progress").inner_text() == "1 of 1 image answered."

    screenshot = os.environ.get("WEB_PAGE_SCREENSHOT")
    if screenshot:
        tab.page.screenshot(path=screenshot, full_page=True)
    assert not tab.external_requests(), tab.external_requests()
    assert not tab.console_errors, tab.console_errors


def test_several_photos_at_once_each_get_their_own_labels(tab, lite0_service, photo_classes):
    """Three photos chosen together: three cards in the order chosen, each with its own top-1 label (the
    one /predict gives for that photo)."""
    tab.open()
    names = ["coffee.jpg", "chelsea.jpg", "grace_hopper.jpg"]
    tab.page.locator("#images").set_input_files([DATA / name for name in names])
    tab.page.get_by_text("3 of 3 images answered.").wait_for()
    assert tab.page.locator("#results .file-name").all_inner_texts() == names
    for name in names:
        expected = _predict(lite0_service.url, DATA / name).json()["results"][0]["top_k"][0]["label"]
        assert tab.card(name).locator(".labels li .label").first.inner_text() == expected
    assert tab.card("chelsea.jpg").locator(".labels li .label").first.inner_text() in photo_classes["chelsea.jpg"]


def test_an_image_dropped_on_the_page_is_classified(tab):
    """A file dropped on the drop zone (a real drop event carrying a File) is sent like a chosen one."""
    tab.open()
    payload = base64.b64encode((DATA / "coffee.jpg").read_bytes()).decode()
    transfer = tab.page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            return dt;
        }""",
        payload,
    )
    tab.page.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": transfer})
    tab.page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    tab.card("dropped.jpg").get_by_text("espresso", exact=True).wait_for()


def test_the_features_switch_shows_dimension_norm_and_first_values(tab, lite0_service):
    """With "Features" and "L2-normalised" chosen (by their accessible names), the card shows the
    dimension /info gives, a norm of 1 and the first values of the /features embedding."""
    tab.open()
    normalize = tab.page.get_by_label("L2-normalised")
    assert normalize.is_disabled()  # meaningful only for features
    tab.page.get_by_role("radio", name="Features (embedding)").check()
    normalize.check()
    tab.page.locator("#images").set_input_files(DATA / "coffee.jpg")
    features = tab.card("coffee.jpg").locator("dl.features")
    features.wait_for()
    values = dict(
        zip(features.locator("dt").all_inner_texts(), features.locator("dd").all_inner_texts(), strict=True)
    )

    info = httpx.get(f"{lite0_service.url}/info", timeout=10).json()
    with (DATA / "coffee.jpg").open("rb") as f:
        embedding = httpx.post(
            f"{lite0_service.url}/features", files={"file": ("coffee.jpg", f)}, params={"normalize": True}, timeout=60
        ).json()["results"][0]["embedding"]
    assert values["Dimension"] == str(info["num_features"]) == "1280"
    assert values["L2 norm (normalised)"] == "1.0000"
    first = [float(v) for v in values["First 8 values"].strip("[]").split(", ")[:8]]
    assert first == pytest.approx(embedding[:8], abs=1e-4)
    assert "features in" in tab.card("coffee.jpg").locator(".meta").inner_text()


def test_a_non_image_shows_the_services_own_error_message(tab, lite0_service, tmp_path):
    """A text file sent from the page: its card shows, as an alert, exactly the error.message the service
    answers for that file, with the status and code; a good image chosen next to it still gets its labels."""
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    answer = _predict(lite0_service.url, notes)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]

    tab.open()
    tab.page.locator("#images").set_input_files([notes, DATA / "coffee.jpg"])
    alert = tab.card("notes.txt").get_by_role("alert")
    alert.wait_for()
    assert alert.inner_text() == message
    assert "HTTP 400 invalid_image" in tab.card("notes.txt").locator(".meta").inner_text()
    tab.card("coffee.jpg").get_by_text("espresso", exact=True).wait_for()
    tab.page.get_by_text("1 of 2 images answered, 1 failed.").wait_for()


def test_the_page_is_usable_from_the_keyboard(tab):
    """Tab from the top of the page reaches the file input (pressing Space opens the file chooser) and the
    mode radios; every control has an accessible name and the results are announced in a live region."""
    tab.open()
    page = tab.page
    focused: list[str] = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.value || ''"))
        if focused[-1] == "images":
            break
    assert "predict" in focused and focused[-1] == "images", focused
    # Headless Chromium now and then drops the first chooser of a page (about 1 run in 7 here, never
    # twice in a row); the property is that Space on the focused input opens it, so up to three presses.
    for attempt in range(3):
        assert page.evaluate("document.activeElement.id") == "images"
        try:
            with page.expect_file_chooser(timeout=10_000) as chooser:
                page.keyboard.press("Space")
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    chooser.value.set_files(DATA / "coffee.jpg")
    tab.card("coffee.jpg").get_by_text("espresso", exact=True).wait_for()
    assert page.locator("#progress").get_attribute("role") == "status"
    for control in page.locator("input:visible, button:visible").all():
        name = control.evaluate(
            "el => (el.labels && el.labels.length ? el.labels[0].textContent : el.textContent || '').trim()"
        )
        assert name, control.evaluate("el => el.outerHTML")


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_for_the_tab_only(browser, start_service):
    """On a server with EFFNET_API_KEY the page shows the key form at once (from /info); an image sent
    without the key shows the service's 401 message and focuses the key field; entering the key (Enter)
    sends the image again and it is classified. The key is in sessionStorage only: a reload of the tab
    keeps it, a new tab does not have it, and it is never in localStorage or a cookie."""
    service = start_service({"EFFNET_MODEL": "efficientnet-lite0", "EFFNET_API_KEY": KEY})
    refused = _predict(service.url, DATA / "coffee.jpg")
    assert refused.status_code == 401
    tab = Tab(browser, service.url)
    try:
        tab.open()
        page = tab.page
        key_field = page.get_by_role("textbox", name="API key")
        assert key_field.is_visible()
        page.locator("#images").set_input_files(DATA / "coffee.jpg")
        alert = tab.card("coffee.jpg").get_by_role("alert")
        alert.wait_for()
        assert alert.inner_text() == refused.json()["error"]["message"]
        expect(key_field).to_be_focused()

        page.keyboard.type(KEY)
        page.keyboard.press("Enter")
        tab.card("coffee.jpg").get_by_text("espresso", exact=True).wait_for()
        assert page.evaluate("sessionStorage.getItem('effnet-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0
        assert tab.context.cookies() == []

        page.reload()
        page.locator("#images").set_input_files(DATA / "coffee.jpg")
        tab.card("coffee.jpg").get_by_text("espresso", exact=True).wait_for()

        other = tab.context.new_page()
        other.goto(service.url + "/")
        assert other.evaluate("sessionStorage.getItem('effnet-api-key')") is None
        other.close()

        page.get_by_role("button", name="Forget key").click()
        assert page.evaluate("sessionStorage.getItem('effnet-api-key')") is None
        page.get_by_role("button", name="Run again on these images").click()
        tab.card("coffee.jpg").get_by_role("alert").wait_for()
        assert not tab.external_requests(), tab.external_requests()
    finally:
        tab.close()
        service.stop()


def test_an_iphone_heic_and_an_avif_are_offered_chosen_and_dropped(tab, tmp_path):
    """The hint and the picker's accept list come from /info (HEIC and AVIF included, by extension too,
    as some systems give .heic no image/* type); an iPhone-style HEIC chosen through the picker and an
    AVIF dropped on the page are both classified (Chromium cannot show a HEIC thumbnail; that is all)."""
    from PIL import Image

    from service.core.imaging import ACCEPTED_EXTENSIONS, formats_text
    from tests.helpers.heif import iphone_style_heic, to_avif

    upright = Image.open(DATA / "coffee.jpg").convert("RGB")
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(iphone_style_heic(upright))
    tab.open()
    assert tab.page.locator("#formats").inner_text() == formats_text()
    accept = tab.page.locator("#images").get_attribute("accept").split(",")
    assert {".heic", ".heif", ".avif"} <= set(accept) and set(accept) == {"image/*", *ACCEPTED_EXTENSIONS}
    tab.page.locator("#images").set_input_files(heic)
    tab.card("IMG_0001.HEIC").get_by_text("espresso", exact=True).wait_for()

    transfer = tab.page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "shared.avif", { type: "image/avif" }));
            return dt;
        }""",
        base64.b64encode(to_avif(upright)).decode(),
    )
    tab.page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    tab.card("shared.avif").get_by_text("espresso", exact=True).wait_for()
    tab.page.get_by_text("2 of 2 images answered.").wait_for()
    assert not tab.external_requests(), tab.external_requests()


# ---- several models: the picker -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return two_lite0_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def two_models(start_service, repository) -> Iterator[ServiceProcess]:
    """Both models served, ``b`` the default."""
    service = start_service({"EFFNET_MODEL_REPOSITORY": str(repository), "EFFNET_DEFAULT_MODEL": "b",
                             "EFFNET_BACKEND": "torch"})
    yield service
    service.close()


def _inference_requests(tab: Tab) -> list[str]:
    return [url.removeprefix(tab.base_url + "/") for url in tab.requests
            if url.startswith((tab.base_url + "/predict", tab.base_url + "/features"))]


def test_with_several_models_the_picker_chooses_where_the_images_go(browser, two_models):
    """The picker lists the served models with the default (b) selected and its facts shown; an image goes
    to b (b's own labels); after choosing a, its facts are shown and the same image, sent again, gets a's
    labels, for predict and features alike. Every request names its model; no CSP error, nothing external."""
    tab = Tab(browser, two_models.url)
    try:
        tab.open()
        page = tab.page
        picker = page.get_by_label("Model")
        assert page.locator("#model-picker").is_visible()
        assert picker.locator("option").all_inner_texts() == ["a", "b"]
        assert picker.input_value() == "b"
        assert page.locator("#model-info").inner_text().startswith("b (efficientnet-lite0): 1000 classes")

        expected = _predict(two_models.url, DATA / "coffee.jpg").json()["results"][0]["top_k"][0]["label"]
        assert expected in B_LABELS  # the default model answers a request that names none
        page.locator("#images").set_input_files(DATA / "coffee.jpg")
        card = tab.card("coffee.jpg")
        card.get_by_text(expected, exact=True).wait_for()
        assert " · b · top-5 in" in card.locator(".meta").inner_text()

        picker.select_option("a")
        expect(page.locator("#model-info")).to_have_text(re.compile(r"^a \(efficientnet-lite0\): 1000 classes"))
        page.get_by_role("button", name="Run again on these images").click()
        card.get_by_text("espresso", exact=True).wait_for()
        assert " · a · top-5 in" in card.locator(".meta").inner_text()

        page.get_by_role("radio", name="Features (embedding)").check()
        page.get_by_role("button", name="Run again on these images").click()
        card.locator("dl.features").wait_for()
        assert " · a · features in" in card.locator(".meta").inner_text()

        assert _inference_requests(tab) == ["predict?top_k=5&model=b", "predict?top_k=5&model=a",
                                            "features?normalize=false&model=a"]
        assert not tab.external_requests(), tab.external_requests()
        assert not tab.console_errors, tab.console_errors
    finally:
        tab.close()


def test_with_several_models_and_no_default_the_first_is_chosen(browser, start_service, repository):
    """Without EFFNET_DEFAULT_MODEL, /info describes the first model by name (and lists both): the page
    chooses it and sends the image to it."""
    service = start_service({"EFFNET_MODEL_REPOSITORY": str(repository), "EFFNET_BACKEND": "torch"})
    tab = Tab(browser, service.url)
    try:
        described = httpx.get(f"{service.url}/info", timeout=10).json()
        assert described["model"] == "a" and not any(m["default"] for m in described["models"])
        tab.open()
        page = tab.page
        assert page.get_by_label("Model").input_value() == "a"
        assert page.locator("#model-info").inner_text().startswith("a (efficientnet-lite0):")
        page.locator("#images").set_input_files(DATA / "coffee.jpg")
        tab.card("coffee.jpg").get_by_text("espresso", exact=True).wait_for()
        assert _inference_requests(tab) == ["predict?top_k=5&model=a"]
        reads = [url.removeprefix(service.url + "/") for url in tab.requests if "/info" in url or "/v2/" in url]
        assert reads == ["info"]
        assert not tab.console_errors, tab.console_errors
    finally:
        tab.close()
        service.stop()


def test_show_why_draws_the_clicked_labels_map_over_the_photo(tab, lite0_service):
    """With "Show why" on, chelsea.jpg's card draws the photo with the top-1 class's activation map over the
    box the model saw; clicking another label draws that class's map instead. The screenshot of the drawing
    holds the map /explain gives: red at its hottest cell, blue at its coldest, the strip outside the box
    dimmed."""
    import io

    import numpy as np
    from PIL import Image

    tab.open()
    tab.page.get_by_label("Show why (class activation map)").check()
    tab.page.locator("#images").set_input_files(DATA / "chelsea.jpg")
    card = tab.card("chelsea.jpg")
    canvas = card.locator("canvas.why-canvas")
    with (DATA / "chelsea.jpg").open("rb") as f:
        explained = httpx.post(f"{lite0_service.url}/explain", files={"file": ("chelsea.jpg", f)},
                               params={"top_k": 5}, timeout=60).json()["results"][0]
    expect(canvas).to_have_attribute("data-class-index", str(explained["maps"][0]["index"]), timeout=WAIT_MS)
    picked = explained["maps"][2]
    card.get_by_role("button", name=picked["label"], exact=True).click()
    expect(canvas).to_have_attribute("data-class-index", str(picked["index"]), timeout=WAIT_MS)
    assert card.get_by_role("button", name=picked["label"], exact=True).get_attribute("aria-pressed") == "true"
    assert picked["label"] in card.locator("figcaption").inner_text()

    drawn = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=int)
    photo = np.asarray(Image.open(DATA / "chelsea.jpg").convert("RGB").resize(drawn.shape[1::-1]), dtype=int)
    crop, grid = explained["crop"], np.asarray(picked["map"])
    fx, fy = drawn.shape[1] / crop["width"], drawn.shape[0] / crop["height"]
    cell = (crop["right"] - crop["left"]) / 7

    def at(index: int) -> np.ndarray:
        i, j = divmod(index, 7)
        return drawn[int((crop["top"] + (i + 0.5) * cell) * fy), int((crop["left"] + (j + 0.5) * cell) * fx)]

    hot, cold = at(int(grid.argmax())), at(int(grid.argmin()))
    assert hot[0] > hot[2] + 30 and cold[2] > cold[0] + 30, (hot, cold)
    strip = slice(0, int(crop["left"] * fx) - 3)
    assert drawn[:, strip].mean() < 0.6 * photo[:, strip].mean()  # outside the box: dimmed
    screenshot = os.environ.get("WEB_PAGE_WHY_SCREENSHOT")
    if screenshot:
        card.screenshot(path=screenshot)
    assert not tab.external_requests(), tab.external_requests()
    assert not tab.console_errors, tab.console_errors
