"""GPU check for a lent accelerator: correctness against CPU float32, then a throughput/latency table.

For B0, B4 and B7 (random weights with randomised BatchNorm statistics, so nothing is trivially zero):
the inference form the service runs (static padding, folded BatchNorm, channels-last) on the GPU in
float32, float16 and bfloat16 is compared with the plain eager model on the CPU in float32; then images/s
and latency per batch at several batch sizes, eager and with a CUDA graph per batch size.

Needs only torch and this repository (no service dependencies). Run through benchmarks/gpu_check.sh
(``python3 -m benchmarks.gpu_check`` from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from model import EfficientNet, fold_batchnorm
from model.export import export_form

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(name: str) -> EfficientNet:
    torch.manual_seed(0)
    net = EfficientNet.from_name(name).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def inference_form(net: EfficientNet, size: int, dtype: torch.dtype) -> torch.nn.Module:
    form = fold_batchnorm(export_form(net, size))
    return form.to("cuda", dtype=dtype, memory_format=torch.channels_last).eval()


def check(name: str, net: EfficientNet, size: int, rows: list) -> None:
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(x)
        for label, dtype in DTYPES.items():
            out = inference_form(net, size, dtype)(x.to("cuda", dtype).contiguous(memory_format=torch.channels_last))
            out = out.float().cpu()
            rel = float((out - ref).abs().max() / ref.abs().max())
            cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=1).min())
            top1 = float((out.argmax(1) == ref.argmax(1)).float().mean())
            limit = 1e-3 if dtype == torch.float32 else 5e-2
            ok = rel < limit
            rows.append({"variant": name, "dtype": label, "max_rel_err": rel, "min_cosine": cos, "top1_agree": top1,
                         "ok": ok})
            print(f"check {name:16s} {label:9s} max rel err {rel:.2e}  min cosine {cos:.6f}  top-1 agree {top1:.2f}"
                  f"  {'OK' if ok else 'FAIL'}", flush=True)


def bench(name: str, net: EfficientNet, size: int, dtype: torch.dtype, batches: list[int], seconds: float,
          rows: list) -> None:
    form = inference_form(net, size, dtype)
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                form(x)
            torch.cuda.synchronize()
            for mode in ("eager", "cuda graph"):
                if mode == "cuda graph":
                    graph = torch.cuda.CUDAGraph()
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        form(x)
                    torch.cuda.current_stream().wait_stream(stream)
                    with torch.cuda.graph(graph):
                        form(x)
                    step = graph.replay
                else:
                    def step(x=x):
                        form(x)
                times = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 5:
                    t0 = torch.cuda.Event(enable_timing=True)
                    t1 = torch.cuda.Event(enable_timing=True)
                    t0.record()
                    step()
                    t1.record()
                    t1.synchronize()
                    times.append(t0.elapsed_time(t1) / 1e3)
                times.sort()
                p50 = times[len(times) // 2]
                rows.append({"variant": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                             "mode": mode, "images_per_s": batch / p50, "p50_ms": p50 * 1e3,
                             "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3})
                print(f"bench {name:16s} {rows[-1]['dtype']:9s} batch {batch:3d} {mode:10s} "
                      f"{batch / p50:9.1f} img/s  p50 {p50 * 1e3:7.2f} ms", flush=True)
        del x
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["efficientnet-b0", "efficientnet-b4", "efficientnet-b7"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--output", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    checks: list = []
    perf: list = []
    for name in args.variants:
        net = build(name)
        size = net.variant.resolution
        check(name, net, size, checks)
        for dtype in args.dtypes:
            bench(name, net, size, DTYPES[dtype], args.batches, args.seconds, perf)
    Path(args.output).write_text(json.dumps({"device": torch.cuda.get_device_name(), "checks": checks,
                                             "bench": perf}, indent=2))
    print("\n| variant | dtype | batch | mode | images/s | p50 ms |\n|---|---|---|---|---|---|")
    for r in perf:
        print(f"| {r['variant']} | {r['dtype']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.0f} | "
              f"{r['p50_ms']:.2f} |")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
