"""Export to ONNX (verified with onnxruntime) and TorchScript.

Both exports use the network's export form: static "SAME" padding for one image size (no shape arithmetic
in the graph) and plain Swish (a custom autograd Function neither exports nor scripts).

The ONNX input is float32 NCHW, already normalised, by default. With ``uint8_input=True`` it is the uint8
NCHW image (0..255, resized and cropped) and the graph normalises it with the variant's mean/std itself
(``model.preprocess.Normalize``: the same float32 arithmetic as ``normalize``), so a server hands the
runtime a quarter of the bytes and does no per-pixel float work on its decode threads.

Command line::

    python -m model.export --variant efficientnet-lite0 --output lite0.onnx [--weights PATH] [--image-size N]
        [--with-features] [--uint8-input]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import VARIANTS, PreprocessConfig
from .efficientnet import EfficientNet
from .preprocess import Normalize, resize_and_crop, to_uint8_chw
from .weights import WeightsError


class ExportError(RuntimeError):
    """An export that failed or whose result does not match PyTorch."""


FEATURE_MAP = "feature_map"


class _FeaturesAndLogits(nn.Module):
    def __init__(self, net: EfficientNet, feature_map: bool = False):
        super().__init__()
        self.net = net
        self.feature_map = feature_map

    def forward(self, x: torch.Tensor):
        if self.feature_map:
            return self.net.forward_with_feature_map(x)
        return self.net.forward_features_and_logits(x)


class _Uint8Input(nn.Module):
    """uint8 NCHW in; normalised with the variant's mean/std, then ``inner``."""

    def __init__(self, inner: nn.Module, net: EfficientNet) -> None:
        super().__init__()
        self.normalize = Normalize(net.variant.preprocess)
        self.inner = inner

    @property
    def in_channels(self) -> int:
        return self.inner.in_channels if hasattr(self.inner, "in_channels") else self.inner.net.in_channels

    def forward(self, x: torch.Tensor):
        return self.inner(self.normalize(x))


def export_form(net: EfficientNet, image_size: int | None = None) -> EfficientNet:
    """A float32, eval-mode copy of ``net`` with static padding for ``image_size`` and plain Swish.

    ``image_size`` defaults to the size ``net`` was built for, else the input size of the variant's
    preprocessing (its resolution, or the checkpoint's source's own, e.g. torchvision's B2 at 288).
    """
    size = image_size or net.image_size or net.variant.preprocess.input_size
    static = EfficientNet(net.variant, image_size=size, memory_efficient=False)
    static.load_state_dict(net.state_dict())
    return static.float().eval()


def _image_size(module: EfficientNet) -> int:
    size = module.image_size
    return size if isinstance(size, int) else int(size[0])


# The check images: three real photos, each shrunk to 256 pixels on its shorter side (JPEG, 83 KB in all).
# A check of an export must feed what the model will see: uniform random pixels are no image, and a network
# whose BatchNorm statistics come from photos amplifies them into logits of ~190, where float32 rounding in
# the folded graph (BatchNorm into the convolutions, a different summation order) reaches 0.05 while the
# same export agrees with PyTorch to 3e-5 on photos (issue 31). Real photos rather than generated images:
# they are what a served model sees, with no doubt whether a synthetic texture stirs a network's channels
# as photos do (its BatchNorm statistics were measured on photos). These three are free to ship:
# chelsea.jpg (a tabby cat, CC0, Stefan van der Walt, from scikit-image), coffee.jpg (an espresso, CC0,
# Rachel Michetti, from scikit-image), grace_hopper.jpg (public domain, US Navy photo, from matplotlib's
# sample data); see data/check_images/README.md.
CHECK_IMAGES_DIR = Path(__file__).resolve().parent / "data" / "check_images"
CHECK_IMAGE_NAMES = ("chelsea.jpg", "coffee.jpg", "grace_hopper.jpg")

# How close is close enough. Errors are measured per output as a fraction of that output's scale, its
# largest magnitude on the check photos. An export differs from PyTorch by float32 rounding alone (BatchNorm
# folded into the convolutions, other summation orders), and how far rounding carries depends on the
# network. Measured with onnxruntime 1.23 on the check photos (issue 31), against this package's PyTorch:
# - torchvision and timm efficientnet_b0 with random weights and BatchNorm statistics from photos: at most
#   1.4e-5 of the logits' scale over 23 networks at 96 px, 7.3e-6 over 18 at 224 px; the real Lite0 1.0e-6,
#   Lite2 2.4e-6; default-initialised B0-B7 below 1e-6;
# - deeper random networks calibrated the same way amplify rounding more: timm B3 up to 2.0e-4, a
#   torchvision B5 at 96 px 4.7e-4;
# - in all 46 networks the export's error was 0.7-1.7x PyTorch's own float32 error (the same network in
#   float64 on the same photos): the export is as accurate as PyTorch, and the network sets the scale.
# So: within CHECK_TOLERANCE (1e-4, 7x the worst B0) the export passes at once, with no float64 run;
# beyond it, it passes while within FLOAT32_MARGIN (4, over the 1.7 seen) times PyTorch's own float32 error,
# but never beyond MAX_TOLERANCE (1%): a network that unstable in float32 cannot be verified at all.
# A graph that really differs is far outside: one convolution's weights scaled by 1.001 in the middle of
# those B0s moved the logits by 0.6-1.1e-2 of their scale, a classifier shifted by 0.1 by 24-49 times it.
CHECK_TOLERANCE = 1e-4
FLOAT32_MARGIN = 4.0
MAX_TOLERANCE = 1e-2


@functools.lru_cache(maxsize=1)
def _check_photos() -> tuple[Image.Image, ...]:
    photos = []
    for name in CHECK_IMAGE_NAMES:
        with Image.open(CHECK_IMAGES_DIR / name) as image:
            photos.append(image.convert("RGB"))
    return tuple(photos)


def check_images(config: PreprocessConfig, image_size: int | None = None) -> np.ndarray:
    """The check images as the uint8 (4, 3, S, S) batch a model with preprocessing ``config`` sees: the three
    packaged photos, then the first one mirrored, resized and centre-cropped with ``config`` (at
    ``image_size`` when given, with the same crop fraction)."""
    if image_size is not None and image_size != config.input_size:
        config = dataclasses.replace(config, input_size=image_size, resize=None)
    crops = [resize_and_crop(photo, config) for photo in _check_photos()]
    crops.append(crops[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return np.stack([to_uint8_chw(crop) for crop in crops])


def _reference_net(reference: nn.Module) -> EfficientNet:
    while not isinstance(reference, EfficientNet):
        reference = reference.inner if isinstance(reference, _Uint8Input) else reference.net
    return reference


def check_onnx(model: str | Path | bytes, reference: nn.Module, image_size: int,
               tolerance: float = CHECK_TOLERANCE, preprocess: PreprocessConfig | None = None) -> float:
    """Run an ONNX model (file or bytes) in onnxruntime and compare each output with ``reference``'s.

    Agreement is measured on the check images (:func:`check_images`, with ``preprocess``, by default the
    reference network's own), at batch 1 and 4, as each output's largest error over its largest magnitude
    there. Within ``tolerance`` it passes; beyond, it passes only while within :data:`FLOAT32_MARGIN` times
    PyTorch's own float32 error (against the reference run in float64) and :data:`MAX_TOLERANCE`. Random
    pixels (or a random normal tensor for a float input) are run too, for the outputs' shapes and
    finiteness only: noise is no input a model is made for, and its answers say nothing of the export.

    Returns the largest relative error seen; raises :class:`ExportError` naming the output, the error, the
    output's scale and the tolerance when the export does not match.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("onnxruntime is needed to verify the export: pip install onnx onnxruntime") from exc
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    uint8 = session.get_inputs()[0].type == "tensor(uint8)"
    net = _reference_net(reference)
    config = preprocess or net.variant.preprocess
    pixels = torch.from_numpy(check_images(config, image_size))
    photos = pixels if uint8 else Normalize(config)(pixels)
    if not uint8 and net.in_channels != 3:  # a float network of other channels: the photos in grey
        photos = photos.mean(1, keepdim=True).expand(-1, net.in_channels, -1, -1).contiguous()
    with torch.inference_mode():
        expected = _outputs(reference(photos))
    # Each output's scale: its largest magnitude over the check images; a floor far below any real output's
    # compares an output of zeros (a zero-initialised head) in absolute terms instead of dividing by zero.
    scales = [max(float(np.abs(e).max()), 1e-6) if e.size else 1.0 for e in expected]
    errors = [(0.0, 0.0, 0)] * len(names)  # per output: (relative error, abs error, batch) at its worst
    for batch in (photos[:1], photos):
        got = session.run(None, {"input": batch.numpy()})
        for i, (name, e, g) in enumerate(zip(names, expected, got, strict=True)):
            e = e[:len(batch)]
            if g.shape != e.shape:
                raise ExportError(f"onnxruntime output {name} has shape {g.shape}, PyTorch {e.shape}")
            if e.size == 0:  # the logits of a network without a classifier
                continue
            if not np.isfinite(g).all():
                raise ExportError(f"onnxruntime output {name} is not finite on the check photos")
            err = float(np.abs(g - e).max())
            if err / scales[i] > errors[i][0]:
                errors[i] = (err / scales[i], err, len(batch))
    worst = max(relative for relative, _, _ in errors)
    if worst > tolerance:
        own = _float32_error(reference, photos, expected, scales)
        for name, (relative, err, batch), scale, f32 in zip(names, errors, scales, own, strict=True):
            allowed = max(tolerance, min(MAX_TOLERANCE, FLOAT32_MARGIN * f32))
            if not relative <= allowed:
                raise ExportError(
                    f"onnxruntime output {name} differs from PyTorch on the check photos at batch {batch}: "
                    f"max abs error {err:.3g} with {name} up to {scale:.3g} ({relative:.2g} of it; tolerance "
                    f"{allowed:.2g}; PyTorch's own float32 error {f32:.2g})"
                )
    _check_noise(session, names, expected, photos, uint8)
    return worst


def _outputs(result) -> list[np.ndarray]:
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


def _float32_error(reference: nn.Module, photos: torch.Tensor, expected: list[np.ndarray],
                   scales: list[float]) -> list[float]:
    """Per output, how far ``reference``'s float32 result is from the same network in float64 on ``photos``,
    relative to the output's scale: the rounding error the network itself amplifies."""
    exact = copy.deepcopy(reference).double()
    with torch.inference_mode():  # uint8 photos are promoted to float64 by the (now float64) normalisation
        result = _outputs(exact(photos if photos.dtype == torch.uint8 else photos.double()))
    return [float(np.abs(e.astype(np.float64) - r).max()) / s if e.size else 0.0
            for e, r, s in zip(expected, result, scales, strict=True)]


def _check_noise(session, names: list[str], expected: list[np.ndarray], photos: torch.Tensor, uint8: bool) -> None:
    """Random pixels (a random normal tensor for a float input): the outputs' shapes and finiteness only."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, *photos.shape[1:])
    if uint8:
        noise = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    else:
        noise = torch.randn(*shape, generator=generator)
    for name, e, g in zip(names, expected, session.run(None, {"input": noise.numpy()}), strict=True):
        if g.shape != (2, *e.shape[1:]):
            raise ExportError(f"onnxruntime output {name} has shape {g.shape} on a batch of 2, expected "
                              f"{(2, *e.shape[1:])}")
        if not np.isfinite(g).all():
            raise ExportError(f"onnxruntime output {name} is not finite (NaN or inf) on random pixels")


def _to_onnx(net: EfficientNet, target, image_size: int | None, opset: int,
             with_features: bool, check: bool, uint8_input: bool = False, with_feature_map: bool = False) -> None:
    form = export_form(net, image_size)
    size = _image_size(form)
    with_features = with_features or with_feature_map
    module: nn.Module = _FeaturesAndLogits(form, with_feature_map) if with_features else form
    if uint8_input:
        module = _Uint8Input(module, form)
    # eval() on the wrapper too: the exporter restores the top module's mode afterwards, recursively.
    module = module.eval()
    outputs = ["features", "logits"] if with_features else ["logits"]
    if with_feature_map:
        outputs.append(FEATURE_MAP)
    dummy = torch.zeros(1, form.in_channels, size, size, dtype=torch.uint8 if uint8_input else torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on the static size check are expected
            torch.onnx.export(
                module, (dummy,), target, input_names=["input"], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["input", *outputs]},
                opset_version=opset, dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; one clear error for the caller
        raise ExportError(f"ONNX export of {net.variant.name} failed: {exc}") from exc
    if check:
        check_onnx(target.getvalue() if isinstance(target, io.BytesIO) else target, module, size)


def export_onnx(net: EfficientNet, path: str | Path, image_size: int | None = None, opset: int = 17,
                with_features: bool = False, check: bool = True, uint8_input: bool = False,
                with_feature_map: bool = False) -> Path:
    """Export ``net`` to an ONNX file with a dynamic batch axis; verify it with onnxruntime when ``check``.

    The input is named ``input`` (N, C, S, S): float32 and normalised, or with ``uint8_input`` the uint8
    image (0..255) that the graph normalises with the variant's mean/std. The outputs are ``logits``, or
    ``features`` (the pooled embedding) and ``logits`` when ``with_features``, then ``feature_map`` (the
    head's activated map that was pooled, N x num_features x S/32 x S/32) when ``with_feature_map``: what
    class activation maps are made of. It is computed in every pass anyway; a runtime asked only for the
    other outputs hands it to nobody. ``image_size`` defaults to the size ``net`` was built for, else the
    variant's resolution.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_onnx(net, str(path), image_size, opset, with_features, check, uint8_input, with_feature_map)
    return path


def export_onnx_bytes(net: EfficientNet, image_size: int | None = None, opset: int = 17,
                      with_features: bool = True, check: bool = True, uint8_input: bool = False,
                      with_feature_map: bool = False) -> bytes:
    """Like :func:`export_onnx`, in memory: for a server whose file system is read-only."""
    buffer = io.BytesIO()
    _to_onnx(net, buffer, image_size, opset, with_features, check, uint8_input, with_feature_map)
    return buffer.getvalue()


_PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "QuantizeLinear", "DequantizeLinear", "Identity")


def add_feature_map_output(onnx_model: bytes) -> bytes:
    """``onnx_model`` with a ``feature_map`` output added (unchanged when it has one): the tensor the
    ``features`` output pools (GlobalAveragePool or ReduceMean), found by walking back from ``features``
    through reshapes and quantisation nodes. For a model made elsewhere or before maps existed, such as a
    QDQ int8 model quantised from an export without it: there the map is the dequantised int8 activation.
    ``ExportError`` when ``features`` is not a pooling of one map."""
    import onnx

    model = onnx.load_from_string(onnx_model)
    graph = model.graph
    if any(o.name == FEATURE_MAP for o in graph.output):
        return onnx_model
    producers = {name: node for node in graph.node for name in node.output}
    tensor = "features"
    for _ in range(16):
        node = producers.get(tensor)
        if node is None:
            break
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            pooled = node.input[0]
            graph.node.append(onnx.helper.make_node("Identity", [pooled], [FEATURE_MAP], name="effnet_feature_map"))
            # A graph output needs a shape for the checker: the pooled tensor's, where the model records it,
            # else four named dimensions (the map is N x C x H x W).
            known = {info.name: info for info in list(graph.value_info) + list(graph.output)}
            if pooled in known and known[pooled].type.tensor_type.HasField("shape"):
                output = onnx.ValueInfoProto()
                output.CopyFrom(known[pooled])
                output.name = FEATURE_MAP
            else:
                output = onnx.helper.make_tensor_value_info(
                    FEATURE_MAP, onnx.TensorProto.FLOAT, ["batch", "channels", "height", "width"])
            graph.output.append(output)
            return model.SerializeToString()
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    raise ExportError("the model's 'features' output is not a global average pooling of one feature map")


def without_feature_map_output(onnx_model: bytes) -> bytes:
    """``onnx_model`` without its ``feature_map`` output (and the Identity that only fed it): for a runtime
    that computes every output of a compiled model (OpenVINO), the graph of the passes that ask for no map."""
    import onnx

    model = onnx.load_from_string(onnx_model)
    graph = model.graph
    for output in [o for o in graph.output if o.name == FEATURE_MAP]:
        graph.output.remove(output)
    for node in [n for n in graph.node if n.op_type == "Identity" and list(n.output) == [FEATURE_MAP]]:
        graph.node.remove(node)
    return model.SerializeToString()


def float_input_graph(onnx_model: bytes) -> bytes:
    """The float32 twin of a uint8-input export (:func:`export_onnx_bytes` with ``uint8_input``): the same
    graph and weights without the normalisation at its entry (Cast, Mul, Sub), whose output becomes the
    graph input ``input``, float32 (N, C, S, S) and already normalised.

    For a server that takes the user's own normalised tensors besides uint8 pixels: no second export, and
    the numbers are the network's on exactly the tensor sent. ``ExportError`` when the graph does not begin
    with that normalisation (for example an int8 model whose entry was quantised).
    """
    import onnx

    model = onnx.load_from_string(onnx_model)
    graph = model.graph
    if len(graph.input) != 1 or graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ExportError("float_input_graph needs a graph with one uint8 input")
    entry = graph.input[0]
    # Follow the chain the export writes for model.preprocess.Normalize: Cast -> Mul -> Sub (in a QDQ int8
    # model with a QuantizeLinear/DequantizeLinear pair between them).
    tensor, chain, wanted = entry.name, [], ["Cast", "Mul", "Sub"]
    while wanted:
        consumers = [n for n in graph.node if tensor in n.input]
        if len(consumers) != 1 or consumers[0].op_type not in (wanted[0], "QuantizeLinear", "DequantizeLinear"):
            raise ExportError(f"the graph does not begin with the uint8 normalisation (Cast, Mul, Sub) at {wanted[0]}")
        if consumers[0].op_type == wanted[0]:
            wanted.pop(0)
        chain.append(consumers[0])
        tensor = consumers[0].output[0]
    for node in chain:
        graph.node.remove(node)
    shape = [d for d in entry.type.tensor_type.shape.dim]
    new_input = onnx.helper.make_tensor_value_info(entry.name, onnx.TensorProto.FLOAT, None)
    new_input.type.tensor_type.shape.dim.extend(shape)
    for node in graph.node:  # the normalised tensor is now the graph's input
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = entry.name
    graph.input.remove(entry)
    graph.input.append(new_input)
    # What only fed the normalisation (its constants, their Q/DQ nodes) goes too.
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_torchscript(net: EfficientNet, image_size: int | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the export form of ``net``."""
    return torch.jit.script(export_form(net, image_size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True,
                        help=f"one of: {', '.join(VARIANTS)}; or a timm / torchvision name (tf_efficientnet_lite0 ...)")
    parser.add_argument("--weights", help="local checkpoint file, efficientnet_pytorch, timm or torchvision "
                        "(default: random initialisation)")
    parser.add_argument("--format", default="auto",
                        help="the checkpoint's source: auto, efficientnet_pytorch, timm_tf, timm or torchvision")
    parser.add_argument("--output", required=True, help="ONNX file to write")
    parser.add_argument("--image-size", type=int,
                        help="static input size (default: the preprocessing's, e.g. the variant's resolution)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--with-features", action="store_true", help="also output the pooled features")
    parser.add_argument("--uint8-input", action="store_true",
                        help="take the uint8 NCHW image (0..255) and normalise it inside the graph")
    args = parser.parse_args(argv)
    try:
        if args.weights:
            # The checkpoint's own head (or none), padding, epsilon and normalisation, from any source.
            from .sources import load_source_checkpoint

            net = load_source_checkpoint(args.weights, args.variant, args.format).net
        else:
            net = EfficientNet.from_name(args.variant)
        path = export_onnx(net, args.output, image_size=args.image_size, opset=args.opset,
                           with_features=args.with_features, uint8_input=args.uint8_input)
    except (ValueError, FileNotFoundError, WeightsError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = args.image_size or net.variant.preprocess.input_size
    print(f"exported {args.variant} ({'weights ' + args.weights if args.weights else 'random weights'}) "
          f"at {size}x{size} to {path}; onnxruntime matches PyTorch on the check photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
