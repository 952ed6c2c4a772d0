"""What class activation maps cost (issue 29), in one run so each ratio compares like with like:

1. Engines (Lite0, uint8 batches of the test photos, batch 1 and 8): per engine, three runners take turns
   call by call: "before" (the engine as it was before maps: an ONNX export / int8 model without the
   ``feature_map`` output, the torch network's ``forward_features_and_logits``), "plain" (this engine, no map
   asked: what every request without maps now costs) and "maps" (this engine asked for the feature map, and
   each image's top-1 class activation map made from it, as ``ServedModel._run_batch`` does). Reported:
   plain / before (target: no measurable change) and maps / plain (target <= 1.05).
2. grad-cam: pytorch-grad-cam's own ``GradCAM`` (forward and backward of the PyTorch Lite0, the head's
   activation as target layer) per image, against the torch and onnxruntime engines' pass with a map, on
   the same CPU and threads.
3. The service end to end (one Lite0 server, onnxruntime): one client sending the same photo in turn to
   ``/predict``, ``/explain`` (JSON, the top-5 maps) and ``/explain?format=png``; median latency of each.

    python -m benchmarks.bench_cam [--rounds 5] [--seconds 2] [--threads 2] [--requests 60] [--quick]

Run it under ``flock`` on a shared machine; the load averages before and after are recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import httpx
import numpy as np
import torch

from model import EfficientNet, Normalize, default_weights_path
from service.core.cam import CamWish
from service.core.imaging import Preprocessor
from service.core.runtime import ServedModel
from tests.helpers.images import DATA, PHOTO_NAMES, load_photos
from tests.helpers.server import ServiceProcess

from .common import SUMMARY_MARKER, machine, markdown_table, save_json

VARIANT = "efficientnet-lite0"


def _median_call(fn, seconds: float) -> float:
    """Median seconds of one call of ``fn`` over about ``seconds`` (after one warm call)."""
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _photos(net: EfficientNet, batch: int) -> np.ndarray:
    preprocessor = Preprocessor(net.variant.preprocess, max_pixels=10**8)
    pixels = [preprocessor((DATA / name).read_bytes()) for name in PHOTO_NAMES]
    return np.stack([pixels[i % len(pixels)] for i in range(batch)])


def _with_maps(engine, weights: np.ndarray):
    """``ServedModel._run_batch`` itself, over ``engine``: the pass with the feature map and each row's map."""
    owner = SimpleNamespace(model=SimpleNamespace(engine=engine, classifier=weights))
    wish = CamWish(top=1)
    return lambda batch: ServedModel._run_batch(owner, batch, 0, [wish] * len(batch))


def engines(net: EfficientNet, threads: int, names: list[str], calibration: str | None) -> dict[str, dict]:
    """Per engine: (before, plain, with maps) callables on a batch."""
    from model.export import export_onnx_bytes
    from service.core.engines import build_engine

    weights = net._fc.weight.detach().numpy()
    cpu = torch.device("cpu")
    out: dict[str, dict] = {}
    if "torch" in names:
        engine = build_engine("torch", net, cpu, torch.float32, num_threads=threads, image_size=224)

        def before(batch: np.ndarray, engine=engine) -> object:
            with torch.inference_mode():
                x = engine.normalize(torch.from_numpy(batch)).contiguous(memory_format=torch.channels_last)
                pooled, logits = engine.net.forward_features_and_logits(x)
                return pooled.numpy(), logits.numpy()

        out["torch"] = {"before": before, "plain": engine.run, "maps": _with_maps(engine, weights)}
    old_export = export_onnx_bytes(net, image_size=224, with_features=True, uint8_input=True)
    if "onnxruntime" in names:
        import onnxruntime as ort

        engine = build_engine("onnxruntime", net, cpu, torch.float32, num_threads=threads, image_size=224)
        old = ort.InferenceSession(old_export, engine.session.get_session_options(), providers=["CPUExecutionProvider"])
        out["onnxruntime"] = {"before": lambda b, s=old: s.run(None, {"input": b}), "plain": engine.run,
                              "maps": _with_maps(engine, weights)}
    if "openvino" in names:
        import openvino as ov

        from service.core.engines.openvino_engine import OpenVinoEngine

        engine = OpenVinoEngine(net, cpu, threads, image_size=224)
        core = ov.Core()
        compiled = core.compile_model(core.read_model(old_export), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out["openvino"] = {"before": lambda b, r=request: r.infer({0: b}), "plain": engine.run,
                           "maps": _with_maps(engine, weights)}
    int8 = [n for n in names if n.startswith("int8-")]
    if int8:
        from model.quantize import load_calibration_set, quantize_model, read_photo
        from service.core.engines.int8 import Int8Engine

        if calibration is None:
            import tempfile
            from pathlib import Path

            from tests.helpers.calibration import make_calibration_dir

            calibration = str(make_calibration_dir(Path(tempfile.mkdtemp(prefix="effnet-cam-")) / "c", count=40))
        photos = load_calibration_set(calibration, lambda data: read_photo(data, net.variant.preprocess))
        model = quantize_model(net, photos).model  # as the service quantises: no feature_map output of its own
        for name in int8:
            backend = name.removeprefix("int8-")
            engine = Int8Engine(model, backend, threads, image_size=224)
            if backend == "onnxruntime":
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                old = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                def before(b: np.ndarray, s=old) -> object:
                    return s.run(None, {"input": b})
            else:
                import openvino as ov

                core = ov.Core()
                request = core.compile_model(core.read_model(model), "CPU", {
                    "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                    "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
                def before(b: np.ndarray, r=request) -> object:
                    return r.infer({0: b})
            out[name] = {"before": before, "plain": engine.run, "maps": _with_maps(engine, weights)}
    return out


def measure_engines(net: EfficientNet, args: argparse.Namespace) -> list[dict]:
    """Call by call, the three runners of an engine take turns (in a rotating order) for about
    ``rounds * seconds`` each: drift in the machine's load then hits all three alike, and each ratio is the
    median of the ratios of calls made side by side (paired), not of two separate best cases."""
    runners = engines(net, args.threads, args.engines.split(","), args.calibration)
    rows = []
    for batch_size in (1, 8):
        batch = _photos(net, batch_size)
        for name, kinds in runners.items():
            for fn in kinds.values():
                fn(batch)  # warm
            seen: dict[str, list[float]] = {kind: [] for kind in kinds}
            order = list(kinds.items())
            end, turn = time.perf_counter() + args.rounds * args.seconds * len(kinds), 0
            while time.perf_counter() < end or turn < 10:
                for kind, fn in order[turn % 3:] + order[: turn % 3]:
                    t0 = time.perf_counter()
                    fn(batch)
                    seen[kind].append(time.perf_counter() - t0)
                turn += 1
            median = {kind: statistics.median(times) for kind, times in seen.items()}
            plain_vs_before = statistics.median(p / b for p, b in zip(seen["plain"], seen["before"], strict=True))
            maps_vs_plain = statistics.median(m / p for m, p in zip(seen["maps"], seen["plain"], strict=True))
            rows.append({"engine": name, "batch": batch_size, **{f"{k}_ms": v * 1e3 for k, v in median.items()},
                         "plain_vs_before": plain_vs_before, "maps_vs_plain": maps_vs_plain, "turns": turn})
            print(f"{name:18s} batch {batch_size}: before {median['before'] * 1e3:7.2f} ms, plain "
                  f"{median['plain'] * 1e3:7.2f} ms ({plain_vs_before:.3f}x), maps "
                  f"{median['maps'] * 1e3:7.2f} ms ({maps_vs_plain:.3f}x), {turn} turns", flush=True)
    return rows


def measure_grad_cam(net: EfficientNet, args: argparse.Namespace) -> dict:
    """Per image (batch 1): pytorch-grad-cam's GradCAM against our engines' pass with the map."""
    from service.core.engines import build_engine
    from tests.helpers.gradcam import grad_cam_grids

    batch = _photos(net, 1)
    x = Normalize(net.variant.preprocess)(torch.from_numpy(batch))
    weights = net._fc.weight.detach().numpy()
    cpu = torch.device("cpu")
    ours = {name: _with_maps(build_engine(name, net, cpu, torch.float32, num_threads=args.threads, image_size=224),
                             weights) for name in ("torch", "onnxruntime")}
    top1 = [int(net(x).argmax())]
    times: dict[str, list[float]] = {"grad-cam": [], **{k: [] for k in ours}}
    for _ in range(args.rounds):
        times["grad-cam"].append(_median_call(lambda: grad_cam_grids(net, x, top1), args.seconds))
        for name, fn in ours.items():
            times[name].append(_median_call(lambda fn=fn: fn(batch), args.seconds))
    best = {k: min(v) * 1e3 for k, v in times.items()}
    print(f"grad-cam {best['grad-cam']:.1f} ms per image; ours: torch {best['torch']:.1f}, onnxruntime "
          f"{best['onnxruntime']:.1f} ms", flush=True)
    return {"grad_cam_ms": best["grad-cam"], "torch_maps_ms": best["torch"], "onnxruntime_maps_ms": best["onnxruntime"],
            "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}


def measure_service(args: argparse.Namespace) -> dict:
    photo = load_photos(["chelsea.jpg"])["chelsea.jpg"]
    env = {"EFFNET_MODEL": VARIANT, "EFFNET_NUM_THREADS": str(args.threads), "EFFNET_GRPC_PORT": "0"}
    targets = {"predict": ("/predict", {"top_k": 5}), "explain": ("/explain", {"top_k": 5}),
               "explain_png": ("/explain", {"format": "png"})}
    times: dict[str, list[float]] = {k: [] for k in targets}
    with ServiceProcess(env) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        headers = {"Content-Type": "image/jpeg"}
        for path, params in targets.values():  # warm
            for _ in range(3):
                client.post(path, params=params, content=photo, headers=headers).raise_for_status()
        for _ in range(args.requests):
            for name, (path, params) in targets.items():
                t0 = time.perf_counter()
                client.post(path, params=params, content=photo, headers=headers).raise_for_status()
                times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"service: /predict {median['predict']:.1f} ms, /explain {median['explain']:.1f} ms "
          f"({median['explain'] / median['predict']:.3f}x), png {median['explain_png']:.1f} ms "
          f"({median['explain_png'] / median['predict']:.3f}x)", flush=True)
    return {"median_ms": median, "requests": args.requests,
            "explain_vs_predict": median["explain"] / median["predict"],
            "png_vs_predict": median["explain_png"] / median["predict"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per runner and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60, help="per endpoint, end to end")
    parser.add_argument("--engines", default="torch,onnxruntime,openvino,int8-onnxruntime,int8-openvino")
    parser.add_argument("--calibration", help="a folder of photos for the int8 model (default: views of the "
                                              "test photos)")
    parser.add_argument("--quick", action="store_true", help="one short round of everything (to try the script)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.requests = 1, 0.3, 5
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    net = EfficientNet.from_pretrained(VARIANT, default_weights_path(VARIANT)).eval()
    rows = measure_engines(net, args)
    grad_cam = measure_grad_cam(net, args)
    service = measure_service(args)
    load_after = os.getloadavg()
    result = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "seconds": args.seconds,
              "load_before": load_before, "load_after": load_after, "engines": rows, "grad_cam": grad_cam,
              "service": service}
    save_json("cam", result)
    print(SUMMARY_MARKER)
    print(f"Lite0, {args.threads} threads; engines: medians of calls taking turns, ratios the medians of "
          f"side-by-side calls; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after ({machine()}).\n")
    print(markdown_table(rows, [("engine", "engine", ""), ("batch", "batch", ""),
                                ("before_ms", "before maps, ms", ".2f"), ("plain_ms", "no map asked, ms", ".2f"),
                                ("plain_vs_before", "x before", ".3f"),
                                ("maps_ms", "maps asked, ms", ".2f"), ("maps_vs_plain", "x no map", ".3f")]))
    print(f"\nPer image: pytorch-grad-cam GradCAM {grad_cam['grad_cam_ms']:.1f} ms; ours with the map: torch "
          f"{grad_cam['torch_maps_ms']:.1f} ms, onnxruntime {grad_cam['onnxruntime_maps_ms']:.1f} ms.")
    median = service["median_ms"]
    print(f"\nEnd to end (one client, chelsea.jpg, medians of {service['requests']}): /predict "
          f"{median['predict']:.1f} ms, /explain {median['explain']:.1f} ms ({service['explain_vs_predict']:.3f}x), "
          f"/explain?format=png {median['explain_png']:.1f} ms ({service['png_vs_predict']:.3f}x).")


if __name__ == "__main__":
    main()
