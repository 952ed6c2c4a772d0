"""The int8 recipe study: each choice of ``model.quantize`` against its alternatives, on real photos.

Lite0 with its packaged weights, quantised from the uint8-input export; calibrated on the first of every
ten photos (by name) of a labelled ImageNet folder (see benchmarks/bench_int8.py) and measured on the
others: top-1 accuracy, top-1 agreement with float32, calibration time, and speed at batch 1 and 8 as a
ratio to float32 onnxruntime (the models take turns over several rounds; each keeps its best).

    python -m benchmarks.bench_int8_recipes --photos DIR [--recipes chosen per-tensor ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from model import EfficientNet, default_weights_path
from model.quantize import float_export, quantize_onnx, top1
from service.core.engines import OnnxRuntimeEngine
from service.core.engines.int8 import Int8Engine
from service.core.imaging import Preprocessor

from .bench_int8 import labelled_photos, split
from .common import SUMMARY_MARKER, machine, markdown_table, save_json, summarize, time_callable


def recipes(float_model: bytes) -> dict[str, tuple[dict, bool]]:
    """name -> (quantize_static overrides, run quant_pre_process first)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    nodes = onnx.load_from_string(float_model).graph.node
    classifier = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    normalisation = [n.name for n in nodes if n.name.startswith("/normalize/")]
    return {
        "chosen: per-channel s8 weights, u8 activations, min-max": ({}, True),
        "per-tensor weights": ({"per_channel": False}, True),
        "entropy calibration": ({"calibrate_method": CalibrationMethod.Entropy}, True),
        "percentile calibration (99.999)": ({"calibrate_method": CalibrationMethod.Percentile,
                                             "extra_options": {"CalibPercentile": 99.999}}, True),
        "classifier kept float32": ({"nodes_to_exclude": classifier + normalisation}, True),
        "input normalisation quantised too": ({"nodes_to_exclude": []}, True),
        "s8 activations": ({"activation_type": QuantType.QInt8}, True),
        "s8 symmetric activations": ({"activation_type": QuantType.QInt8,
                                      "extra_options": {"ActivationSymmetric": True}}, True),
        "reduce_range (7-bit weights)": ({"reduce_range": True}, True),
        "without quant_pre_process": ({}, False),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--recipes", nargs="*", help="substrings of the recipe names to run (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    name = "efficientnet-lite0"
    net = EfficientNet.from_pretrained(name, default_weights_path(name)).eval()
    pre = Preprocessor(net.variant.preprocess, max_pixels=64_000_000)
    files, labels = labelled_photos(args.photos)
    calibrate, held = split(files)
    images = np.stack([pre(p.read_bytes()) for p in files])
    cal, ev, ev_labels = images[calibrate], images[held], labels[held]
    float_model = float_export(net)
    float_top = top1(float_model, ev, num_threads=args.threads)
    print(f"float32: top-1 {(float_top == ev_labels).mean():.4f} on {len(ev)} photos", flush=True)

    runners = {"float32": OnnxRuntimeEngine(net, torch.device("cpu"), args.threads, image_size=224)}
    rows = []
    for label, (overrides, pre_process) in recipes(float_model).items():
        if args.recipes and not any(s in label for s in args.recipes):
            continue
        t = time.perf_counter()
        # Equal batches of 4 (100 photos): the histogram calibrators need batches of one size.
        model = quantize_onnx(float_model, cal, overrides=overrides, pre_process=pre_process, batch_size=4)
        seconds = time.perf_counter() - t
        top = top1(model, ev, num_threads=args.threads)
        rows.append({"recipe": label, "top1": float((top == ev_labels).mean()),
                     "agreement": float((top == float_top).mean()), "calibrate_s": seconds})
        runners[label] = Int8Engine(model, "onnxruntime", args.threads, image_size=224)
        print(rows[-1], flush=True)

    for batch in (1, 8):
        pixels = np.ascontiguousarray(ev[:batch])
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, engine in runners.items():
                time.sleep(0.3)
                r = summarize(time_callable(lambda e=engine, x=pixels: e.run(x), args.seconds / args.rounds), batch)
                best[label] = max(best.get(label, 0.0), r["images_per_s"])
        for row in rows:
            row[f"b{batch}"] = best[row["recipe"]] / best["float32"]

    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; {args.threads} threads; Lite0; calibrated on {len(cal)} photos, measured on "
          f"{len(ev)} others; float32 top-1 {(float_top == ev_labels).mean():.4f}")
    print(markdown_table(rows, [("recipe", "recipe", ""), ("top1", "top-1", ".4f"),
                                ("agreement", "same top-1 as float32", ".4f"), ("calibrate_s", "quantise s", ".1f"),
                                ("b1", "x float32 b1", ".2f"), ("b8", "x float32 b8", ".2f")]))
    save_json("int8_recipes", {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
