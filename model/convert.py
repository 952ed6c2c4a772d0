"""Convert a user's checkpoint (efficientnet_pytorch, timm, torchvision; any container; .pth/.pt/.bin/.tar or
.safetensors) into this package's canonical form, and say what was detected.

The canonical file is a ``torch.save`` of ``{"state_dict": ..., "effnet_config": {...}}``: efficientnet_pytorch's
key names plus plain data naming the variant, the source format (hence padding, BatchNorm epsilon and
preprocessing) and the class count. The service loads it, or the original, alike.

Command line::

    python -m model.convert SRC OUT [--model NAME] [--format auto|efficientnet_pytorch|timm_tf|timm|torchvision]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .sources import SOURCE_FORMATS, SourceCheckpoint, canonical_checkpoint, load_source_checkpoint
from .weights import WeightsError


def convert(src: str | Path, out: str | Path, model: str = "efficientnet-lite0",
            weights_format: str = "auto") -> SourceCheckpoint:
    """Read ``src``, write its canonical form to ``out``; returns what was detected."""
    source = load_source_checkpoint(src, model, weights_format)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(canonical_checkpoint(source), out)
    return source


def describe(source: SourceCheckpoint) -> str:
    """One paragraph on what a checkpoint was detected to be."""
    config = source.net.variant.global_config
    pre = source.net.variant.preprocess
    head = f"{source.num_classes} classes" if source.num_classes else "no classifier (features only)"
    where = f" under '{source.container}'" if source.container else ""
    arch = f", architecture {source.arch}" if source.arch else ""
    return (f"{source.source_format} checkpoint ({source.file_format}{where}{arch}): {source.net.variant.name}, "
            f"{head}; padding {config.padding}, BatchNorm eps {config.batch_norm_epsilon:g}; preprocessing "
            f"{pre.input_size}px from {pre.resize_size}px, {pre.interpolation}, mean {list(pre.mean)}, "
            f"std {list(pre.std)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the checkpoint to convert")
    parser.add_argument("out", help="where to write the canonical checkpoint (.pth)")
    parser.add_argument("--model", default="efficientnet-lite0",
                        help="variant (efficientnet-b0 ...) or a timm / torchvision name (tf_efficientnet_lite0 ...)")
    parser.add_argument("--format", default="auto", choices=("auto", *SOURCE_FORMATS),
                        help="the checkpoint's source (default: detected from its keys)")
    args = parser.parse_args(argv)
    try:
        source = convert(args.src, args.out, args.model, args.format)
    except (ValueError, FileNotFoundError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.src}: {describe(source)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
