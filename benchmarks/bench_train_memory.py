"""Peak memory of one B0 training step: MemoryEfficientSwish against plain Swish.

Each mode runs in a fresh subprocess, so its peak resident set size (ru_maxrss) is its own. The bytes
autograd saves for backward are also counted exactly, through saved-tensor hooks.

    python -m benchmarks.bench_train_memory [--batch 32] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MODES = {
    "naive": "x * sigmoid(x) in plain autograd (what efficientnet_pytorch's Swish does)",
    "plain": "Swish (F.silu)",
    "efficient": "MemoryEfficientSwish",
}


def one_step(mode: str, batch: int, size: int) -> dict:
    import torch

    import model.layers
    from model import EfficientNet

    if mode == "naive":
        model.layers.Swish.forward = lambda self, x: x * torch.sigmoid(x)
    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-b0", memory_efficient=mode == "efficient").train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    saved = {"bytes": 0}
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        # Count each storage once: several ops may save the same tensor.
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return {
        "activation": MODES[mode],
        "batch": batch,
        "size": size,
        "saved_for_backward_mib": saved["bytes"] / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_step_mib": rss_before / 1024,
        "step_s": time.perf_counter() - t0,
        "loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child, args.batch, args.size)))
        return 0

    from .common import SUMMARY_MARKER, markdown_table, save_json

    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_memory", "--child", mode,
                              "--batch", str(args.batch), "--size", str(args.size)],
                             check=True, capture_output=True, text=True, cwd=REPO)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive, plain, eff = rows
    table = markdown_table(rows, [("activation", "activation", ""), ("batch", "batch", "d"), ("size", "size", "d"),
                                  ("saved_for_backward_mib", "saved for backward (MiB)", ".0f"),
                                  ("peak_rss_mib", "peak RSS (MiB)", ".0f"), ("step_s", "step (s)", ".1f")])
    print(SUMMARY_MARKER)
    print(table)
    for ref in (naive, plain):
        print(f"MemoryEfficientSwish / {ref['activation']}: saved for backward "
              f"{eff['saved_for_backward_mib'] / ref['saved_for_backward_mib']:.3f}x, "
              f"peak RSS {eff['peak_rss_mib'] / ref['peak_rss_mib']:.3f}x")
    save_json("train_memory", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
