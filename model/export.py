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
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import VARIANTS
from .efficientnet import EfficientNet
from .preprocess import Normalize
from .weights import WeightsError


class ExportError(RuntimeError):
    """An export that failed or whose result does not match PyTorch."""


class _FeaturesAndLogits(nn.Module):
    def __init__(self, net: EfficientNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def check_onnx(model: str | Path | bytes, reference: nn.Module, image_size: int, batch_sizes=(1, 4),
               atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Run an ONNX model (file or bytes) in onnxruntime, compare each output with ``reference``.

    Returns the largest absolute error; raises :class:`ExportError` beyond the tolerance.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("onnxruntime is needed to verify the export: pip install onnx onnxruntime") from exc
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    in_channels = reference.net.in_channels if isinstance(reference, _FeaturesAndLogits) else reference.in_channels
    uint8 = session.get_inputs()[0].type == "tensor(uint8)"
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        shape = (batch, in_channels, image_size, image_size)
        if uint8:
            x = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        else:
            x = torch.randn(*shape, generator=generator)
        with torch.inference_mode():
            expected = reference(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {"input": x.numpy()})
        for e, g in zip(expected, got, strict=True):
            e = e.numpy()
            if e.size == 0:  # the logits of a network without a classifier
                if g.shape != e.shape:
                    raise ExportError(f"onnxruntime output has shape {g.shape}, PyTorch {e.shape}")
                continue
            # Absolute tolerance in units of the output's scale: a random network's logits can be ~100.
            scaled_atol = atol * max(1.0, float(np.abs(e).max()))
            if e.shape != g.shape or not np.allclose(g, e, atol=scaled_atol, rtol=rtol):
                err = float(np.abs(g - e).max()) if e.shape == g.shape else float("inf")
                raise ExportError(f"onnxruntime output differs from PyTorch at batch {batch}: max abs error {err:.3g}")
            worst = max(worst, float(np.abs(g - e).max()))
    return worst


def _to_onnx(net: EfficientNet, target, image_size: int | None, opset: int,
             with_features: bool, check: bool, uint8_input: bool = False) -> None:
    form = export_form(net, image_size)
    size = _image_size(form)
    module: nn.Module = _FeaturesAndLogits(form) if with_features else form
    if uint8_input:
        module = _Uint8Input(module, form)
    # eval() on the wrapper too: the exporter restores the top module's mode afterwards, recursively.
    module = module.eval()
    outputs = ["features", "logits"] if with_features else ["logits"]
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
                with_features: bool = False, check: bool = True, uint8_input: bool = False) -> Path:
    """Export ``net`` to an ONNX file with a dynamic batch axis; verify it with onnxruntime when ``check``.

    The input is named ``input`` (N, C, S, S): float32 and normalised, or with ``uint8_input`` the uint8
    image (0..255) that the graph normalises with the variant's mean/std. The outputs are ``logits``, or
    ``features`` (the pooled embedding) and ``logits`` when ``with_features``. ``image_size`` defaults to
    the size ``net`` was built for, else the variant's resolution.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_onnx(net, str(path), image_size, opset, with_features, check, uint8_input)
    return path


def export_onnx_bytes(net: EfficientNet, image_size: int | None = None, opset: int = 17,
                      with_features: bool = True, check: bool = True, uint8_input: bool = False) -> bytes:
    """Like :func:`export_onnx`, in memory: for a server whose file system is read-only."""
    buffer = io.BytesIO()
    _to_onnx(net, buffer, image_size, opset, with_features, check, uint8_input)
    return buffer.getvalue()


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
          f"at {size}x{size} to {path}; onnxruntime matches PyTorch to 1e-4 at batch 1 and 4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
