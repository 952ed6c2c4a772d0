"""Int8 (and bf16) on CPU, in one run: engine speed, accuracy on real photos, the service under load, start-up.

Photos: a folder of labelled real photos named like the ImageNet sample sets (``n01440764_tench.JPEG``: the
WordNet id first; with one folder holding all 1000 classes, the sorted ids are the class indices). The
first of every ten photos (by name) is the calibration set; the others are never calibrated on and are
where accuracy and top-1 agreement are measured. Without ``--photos`` only the engine speeds are measured
(calibrated on augmented views of the test photos).

1. Engines: float32 onnxruntime (the default engine), int8 onnxruntime, int8 OpenVINO, bf16 OpenVINO
   (where the CPU has bf16), Lite0 (packaged weights) and B0 (random weights: speed only), batch 1/8/16;
   engines take turns over several rounds and keep their best round.
2. Accuracy: top-1 of each engine on the held-out photos, against the labels and against float32.
3. Service: the server with EFFNET_DTYPE=int8 (calibration folder = the calibration photos) and with
   float32, the same clients posting the held-out photos; top-1 accuracy and agreement read from the
   answers; compared with the offline float32 pipeline built from peers (Pillow decode + resize + crop +
   normalise, onnxruntime float32 at batch 8, one loop). Start-up to ready: float32, int8 with an empty
   cache (quantising), int8 with a warm cache.

    python -m benchmarks.bench_int8 [--photos DIR] [--variants efficientnet-lite0 efficientnet-b0] [--skip-service]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from model import EfficientNet, default_weights_path, get_efficientnet_config, resize_and_crop
from model.quantize import CalibrationSet, calibration_digest, quantize_model
from service.core.engines import OnnxRuntimeEngine, OpenVinoEngine
from service.core.engines.int8 import Int8Engine
from service.core.imaging import Preprocessor
from tests.helpers.calibration import make_calibration_dir
from tests.helpers.server import ServiceProcess

from .common import SUMMARY_MARKER, machine, markdown_table, save_json, summarize, time_callable

WNID = re.compile(r"^(n\d{8})")


def labelled_photos(folder: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(p for p in folder.iterdir() if WNID.match(p.name))
    wnids = sorted({WNID.match(p.name).group(1) for p in files})
    if len(wnids) != 1000:
        raise SystemExit(f"{folder}: expected photos of all 1000 ImageNet classes, found {len(wnids)}")
    index = {w: i for i, w in enumerate(wnids)}
    return files, np.array([index[WNID.match(p.name).group(1)] for p in files])


def split(files: list[Path]) -> tuple[list[int], list[int]]:
    calibrate = [i for i in range(len(files)) if i % 10 == 0]
    held = [i for i in range(len(files)) if i % 10 != 0]
    return calibrate, held


def _net(name: str) -> tuple[EfficientNet, str]:
    path = default_weights_path(name)
    if path:
        return EfficientNet.from_pretrained(name, path).eval(), "packaged weights"
    torch.manual_seed(0)
    return EfficientNet.from_name(name).eval(), "random weights"


def _calibration(pre: Preprocessor, files: list[Path]) -> CalibrationSet:
    # Every photo is calibrated on here (the held-out split of model.quantize is not what we measure).
    return CalibrationSet(np.stack([pre(p.read_bytes()) for p in files]), [p.name for p in files], [],
                          calibration_digest(files))


def build_engines(name: str, calibration_files: list[Path], threads: int) -> tuple[dict, dict]:
    net, weights = _net(name)
    size = net.variant.preprocess.input_size
    pre = Preprocessor(net.variant.preprocess, max_pixels=64_000_000)
    calibration = _calibration(pre, calibration_files)
    t = time.perf_counter()
    q = quantize_model(net, calibration)
    facts = {"weights": weights, "quantise_s": time.perf_counter() - t, "calibration": len(calibration.images)}
    engines = {
        "float32 onnxruntime": OnnxRuntimeEngine(net, torch.device("cpu"), threads, image_size=size),
        "int8 onnxruntime": Int8Engine(q.model, "onnxruntime", threads, image_size=size),
    }
    try:
        import openvino  # noqa: F401
    except ImportError:
        return engines, facts
    engines["int8 OpenVINO"] = Int8Engine(q.model, "openvino", threads, image_size=size)
    engines["float32 OpenVINO"] = OpenVinoEngine(net, torch.device("cpu"), threads, image_size=size)
    try:
        engines["bf16 OpenVINO"] = OpenVinoEngine(net, torch.device("cpu"), threads, image_size=size, bfloat16=True)
    except Exception as exc:  # the CPU lacks bf16: the row is left out, and said so
        facts["bf16"] = str(exc)
    return engines, facts


def engine_speed(name: str, engines: dict, batches: list[int], seconds: float, rounds: int) -> list[dict]:
    size = get_efficientnet_config(name).preprocess.input_size
    rows = []
    for batch in batches:
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for label, engine in engines.items():
                time.sleep(0.3)
                r = summarize(time_callable(lambda e=engine, x=pixels: e.run(x), seconds / rounds), batch)
                if label not in best or r["images_per_s"] > best[label]["images_per_s"]:
                    best[label] = r
        base = best["float32 onnxruntime"]["images_per_s"]
        for label, r in best.items():
            rows.append({"variant": name, "engine": label, **r, "vs_float32": r["images_per_s"] / base})
            speed = r["images_per_s"]
            print(f"{name} batch {batch:2d} {label:22s} {speed:7.1f} img/s ({speed / base:.2f}x)", flush=True)
    return rows


def accuracy(engines: dict, images: np.ndarray, labels: np.ndarray) -> list[dict]:
    tops = {}
    for label, engine in engines.items():
        tops[label] = np.concatenate([engine.run(images[i:i + 16])[1].argmax(1) for i in range(0, len(images), 16)])
    ref = tops["float32 onnxruntime"]
    return [{"engine": k, "photos": len(labels), "top1": float((v == labels).mean()),
             "agreement": float((v == ref).mean())} for k, v in tops.items()]


# --- the service against the offline float32 pipeline built from peers ---------------------------------

def peer_pipeline(files: list[Path], threads: int) -> dict:
    """Pillow (full decode, resize, crop, float normalise) + onnxruntime float32 at batch 8, one loop."""
    import onnxruntime as ort
    from PIL import Image

    from model.export import export_onnx_bytes

    net, _ = _net("efficientnet-lite0")
    config = net.variant.preprocess
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(export_onnx_bytes(net), options, providers=["CPUExecutionProvider"])
    mean = np.array(config.mean, np.float32) * 255
    std = np.array(config.std, np.float32) * 255

    def prep(path: Path) -> np.ndarray:
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            crop = resize_and_crop(im.convert("RGB"), config)
        return ((np.asarray(crop, np.float32) - mean) / std).transpose(2, 0, 1)

    tops = []
    session.run(None, {"input": np.stack([prep(files[0])] * 8)})
    start = time.perf_counter()
    for i in range(0, len(files), 8):
        tops.append(session.run(["logits"], {"input": np.stack([prep(p) for p in files[i:i + 8]])})[0].argmax(1))
    elapsed = time.perf_counter() - start
    return {"images_per_s": len(files) / elapsed, "top1": np.concatenate(tops)}


async def post_all(url: str, files: list[Path], clients: int) -> tuple[float, dict[str, int]]:
    """Every file posted once by ``clients`` concurrent clients: (images/s, top-1 index by file name)."""
    queue = list(enumerate(files))
    answers: dict[str, int] = {}
    bodies = [p.read_bytes() for p in files]

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            i, path = queue.pop()
            r = await c.post("/predict", content=bodies[i], headers={"Content-Type": "image/jpeg"},
                             params={"top_k": 1})
            r.raise_for_status()
            answers[path.name] = r.json()["results"][0]["top_k"][0]["index"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(files) / elapsed, answers


def _start(env: dict[str, str], threads: int) -> tuple[ServiceProcess, float]:
    t = time.perf_counter()
    server = ServiceProcess({**env, "EFFNET_MAX_QUEUE": "256"}, threads=threads, ready_timeout=300)
    server.wait_ready()
    return server, time.perf_counter() - t


def service_runs(files: list[Path], labels: np.ndarray, calibrate: list[int], held: list[int], threads: int,
                 clients: int, extra: dict[str, str]) -> dict:
    """The peer pipeline (before and after the servers; its better run counts) and each server mode."""
    held_files = [files[i] for i in held]
    peers = [peer_pipeline(held_files, threads)]
    print(f"peer pipeline: {peers[0]['images_per_s']:.1f} img/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        cal_dir = Path(tmp, "calibration")
        cal_dir.mkdir()
        for i in calibrate:
            os.symlink(files[i], cal_dir / files[i].name)
        int8 = {"EFFNET_DTYPE": "int8", "EFFNET_CALIBRATION_DIR": str(cal_dir), "EFFNET_CACHE_DIR": f"{tmp}/cache"}
        modes = (("float32 (onnxruntime)", {}, True), ("int8 onnxruntime, empty cache", int8, False),
                 ("int8 onnxruntime, warm cache", int8, True),
                 ("int8 OpenVINO, warm cache", {**int8, "EFFNET_BACKEND": "openvino"}, True))
        reference = None
        for mode, env, measure in modes:
            server, ready_s = _start({**env, **extra}, threads)
            info = httpx.get(f"{server.url}/info").json()
            row = {"mode": mode, "ready_s": ready_s, "cache_hit": (info.get("quantization") or {}).get("cache_hit"),
                   "decode_threads": info.get("threads", {}).get("decode")}
            if measure:
                asyncio.run(post_all(server.url, held_files[:64], clients))  # settle
                rate, answers = asyncio.run(post_all(server.url, held_files, clients))
                top = np.array([answers[p.name] for p in held_files])
                reference = top if reference is None else reference
                row.update(images_per_s=rate, top1=float((top == labels[held]).mean()),
                           agreement=float((top == reference).mean()))
            server.terminate()
            rows.append(row)
            print(row, flush=True)
    peers.append(peer_pipeline(held_files, threads))
    peer = max(peers, key=lambda p: p["images_per_s"])
    base = rows[0]
    for row in rows:
        if "images_per_s" in row:
            row["x_peer"] = row["images_per_s"] / peer["images_per_s"]
            row["x_float32"] = row["images_per_s"] / base["images_per_s"]
        row["ready_x_float32"] = row["ready_s"] / base["ready_s"]
    return {"rows": rows, "peer_images_per_s": [p["images_per_s"] for p in peers],
            "peer_top1": float((peer["top1"] == labels[held]).mean()), "photos": len(held_files),
            "clients": clients, "settings": " ".join(f"{k}={v}" for k, v in extra.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, help="folder of labelled ImageNet photos (n01440764_*.JPEG ...)")
    parser.add_argument("--variants", nargs="*", default=["efficientnet-lite0", "efficientnet-b0"],
                        help="engine rows for these variants (none: the service part only)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--seconds", type=float, default=4.5, help="timed seconds per engine and batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--env", nargs="*", default=[], metavar="EFFNET_X=VALUE",
                        help="extra settings for both servers, e.g. EFFNET_DECODE_THREADS=2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.photos:
        files, labels = labelled_photos(args.photos)
        calibrate, held = split(files)
        calibration_files = [files[i] for i in calibrate]
    else:
        files, labels = [], np.empty(0)
        calibration_files = sorted(make_calibration_dir(Path(tempfile.mkdtemp(prefix="bench-int8-cal-"))).iterdir())

    speed_rows, accuracy_rows, facts = [], [], {}
    for name in args.variants:
        engines, facts[name] = build_engines(name, calibration_files, args.threads)
        print(name, facts[name], flush=True)
        speed_rows += engine_speed(name, engines, args.batches, args.seconds, args.rounds)
        if args.photos and facts[name]["weights"] == "packaged weights":
            pre = Preprocessor(get_efficientnet_config(name).preprocess, max_pixels=64_000_000)
            images = np.stack([pre(files[i].read_bytes()) for i in held])
            for row in accuracy(engines, images, labels[held]):
                accuracy_rows.append({"variant": name, **row})
                print(accuracy_rows[-1], flush=True)
        del engines

    service = None
    if args.photos and not args.skip_service:
        extra = dict(kv.split("=", 1) for kv in args.env)
        service = service_runs(files, labels, calibrate, held, args.threads, args.clients, extra)

    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; {args.threads} threads; calibration: {len(calibration_files)} photos")
    print(markdown_table(speed_rows, [("variant", "variant", ""), ("engine", "engine", ""), ("batch", "batch", "d"),
                                      ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms/batch", ".1f"),
                                      ("vs_float32", "x float32 onnxruntime", ".2f")]))
    if accuracy_rows:
        print()
        print(markdown_table(accuracy_rows, [("variant", "variant", ""), ("engine", "engine", ""),
                                             ("photos", "held-out photos", "d"), ("top1", "top-1", ".4f"),
                                             ("agreement", "same top-1 as float32", ".4f")]))
    if service:
        print()
        peer_runs = " and ".join(f"{v:.1f}" for v in service["peer_images_per_s"])
        print(f"Service: {service['clients']} clients post each of {service['photos']} held-out photos once; "
              f"settings {service['settings'] or 'default'}. Offline float32 pipeline from peers (Pillow + "
              f"onnxruntime float32, batch 8): {peer_runs} img/s before and after the servers (the better counts), "
              f"top-1 {service['peer_top1']:.4f}.")
        rows = [{"images_per_s": float("nan"), "x_peer": float("nan"), "x_float32": float("nan"),
                 "top1": float("nan"), "agreement": float("nan"), **r} for r in service["rows"]]
        print(markdown_table(rows, [("mode", "server", ""), ("images_per_s", "images/s", ".1f"),
                                    ("x_peer", "x peer pipeline", ".2f"), ("x_float32", "x float32 service", ".2f"),
                                    ("top1", "top-1", ".4f"), ("agreement", "same top-1 as float32", ".4f"),
                                    ("ready_s", "ready after start s", ".1f"),
                                    ("ready_x_float32", "x float32 start", ".2f"), ("cache_hit", "cache hit", ""),
                                    ("decode_threads", "decode threads", "")]))
    save_json("int8", {"machine": machine(), "threads": args.threads, "facts": facts, "engines": speed_rows,
                       "accuracy": accuracy_rows, "service": service})
    return 0


if __name__ == "__main__":
    sys.exit(main())
