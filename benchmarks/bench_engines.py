"""Inference engines side by side, in one run: images/s and latency at several batch sizes.

Ours: the service's engines (``service.core.loading.TorchEngine`` and ``OnnxRuntimeEngine``) and the plain
eager model. Peers: the ``efficientnet_pytorch`` / ``efficientnet_lite_pytorch`` packages in eager mode
(NCHW and channels-last), and OpenVINO on our ONNX export when it is installed. Same weights, same
threads, same inputs.

    python -m benchmarks.bench_engines [--variants efficientnet-b0 efficientnet-lite0] [--batches 1 8 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

from model import EfficientNet
from model.export import export_onnx_bytes
from service.core.engines import OnnxRuntimeEngine, TorchEngine

from .common import SUMMARY_MARKER, machine, markdown_table, save_json, summarize, time_callable


def _torch_runner(net: torch.nn.Module, channels_last: bool):
    net = net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def run(x: np.ndarray):
        with torch.inference_mode():
            t = torch.from_numpy(x)
            if channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            return net(t)

    return run


def _reference(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "lite" in name:
            from efficientnet_lite_pytorch import EfficientNet as Ref
        else:
            from efficientnet_pytorch import EfficientNet as Ref
        # The packages' own default: static padding for the variant's resolution.
        return Ref.from_name(name)


def _openvino_runner(net: EfficientNet, size: int, threads: int):
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    onnx_model = core.read_model(export_onnx_bytes(net, image_size=size, with_features=True))
    # f32 inference precision: on CPUs with bf16 OpenVINO would otherwise pick bf16, which is not the
    # same model any more.
    compiled = core.compile_model(onnx_model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()

    def run(x: np.ndarray):
        return request.infer({0: x})

    return run


def engines_for(name: str, threads: int) -> dict[str, tuple[object, bool]]:
    torch.manual_seed(0)
    net = EfficientNet.from_name(name).eval()
    size = net.variant.resolution
    ref = _reference(name)
    ref.load_state_dict(net.state_dict())
    ref.set_swish(memory_efficient=False)
    # The service's engines take the uint8 image and normalise it themselves (their cost includes that);
    # the eager models take the normalised float32 batch.
    runners = {
        "ours: TorchEngine (folded BN, channels-last)": (TorchEngine(net, torch.device("cpu"), torch.float32,
                                                                     image_size=size).run, True),
        "ours: OnnxRuntimeEngine": (OnnxRuntimeEngine(net, torch.device("cpu"), threads, image_size=size).run, True),
        "ours: OnnxRuntimeEngine, spinning threads": (OnnxRuntimeEngine(net, torch.device("cpu"), threads,
                                                                         image_size=size, spinning=True).run, True),
        "ours: eager, NCHW, unfused": (_torch_runner(EfficientNet.from_name(name, memory_efficient=False), False),
                                       False),
        f"peer: {ref.__class__.__module__.split('.')[0]} eager NCHW": (_torch_runner(ref, False), False),
        f"peer: {ref.__class__.__module__.split('.')[0]} eager channels-last": (_torch_runner(ref, True), False),
    }
    ov_run = _openvino_runner(net, size, threads)
    if ov_run is not None:
        runners["peer: OpenVINO (f32) on our ONNX"] = (ov_run, False)
    return runners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["efficientnet-b0", "efficientnet-lite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--seconds", type=float, default=4.5, help="minimum timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns each engine takes; its best one counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.variants:
        runners = engines_for(name, args.threads)
        size = EfficientNet.from_name(name).variant.resolution
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
            pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
            # Engines take turns over several rounds and each keeps its best round: a burst of load from
            # elsewhere on a 2-core machine then hurts one round, not one engine.
            results: dict[str, dict] = {}
            for _ in range(args.rounds):
                for label, (run, takes_uint8) in runners.items():
                    time.sleep(0.5)  # let the previous engine's worker threads go idle
                    inp = pixels if takes_uint8 else x
                    r = summarize(time_callable(lambda run=run, inp=inp: run(inp), args.seconds / args.rounds), batch)
                    if label not in results or r["images_per_s"] > results[label]["images_per_s"]:
                        results[label] = r
            for label, r in results.items():
                print(f"{name} batch {batch:3d} {label:50s} {r['images_per_s']:7.1f} img/s "
                      f"p50 {r['p50_ms']:7.1f} ms", flush=True)
            peers = [r["images_per_s"] for k, r in results.items() if k.startswith("peer:")]
            best_peer = max(peers)
            for label, r in results.items():
                rows.append({"variant": name, "engine": label, **r, "vs_best_peer": r["images_per_s"] / best_peer})

    table = markdown_table(rows, [("variant", "variant", ""), ("engine", "engine", ""), ("batch", "batch", "d"),
                                  ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms/batch", ".1f"),
                                  ("vs_best_peer", "x best peer", ".2f")])
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; {args.threads} threads; float32; inputs at each variant's resolution")
    print(table)
    save_json("engines", {"machine": machine(), "threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
