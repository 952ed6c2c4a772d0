"""Model repositories for the tests of several models: a folder per model with its model.toml, a Lite0
fine-tuned to a head of its own, and the two-model repository the page and batch-command tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from model import EfficientNet, default_weights_path

# ``b``'s own labels in ``two_lite0_models``: a label in an answer says which model gave it.
B_LABELS = [f"b-class {i}" for i in range(1000)]


def write_model(root: Path, name: str, toml: str) -> Path:
    """``root/name/model.toml`` holding ``toml``; the model's folder."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(toml)
    return folder


def save_fine_tuned_lite0(path: Path, classes: int = 10, seed: int = 1) -> None:
    """Lite0 with its ImageNet weights and a fresh ``classes``-way head (as a fine-tuning run starts it),
    saved as efficientnet_pytorch saves a state dict; another ``seed`` gives other head weights."""
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(default_weights_path("efficientnet-lite0"), weights_only=True))
    torch.manual_seed(seed)
    net._fc = torch.nn.Linear(net._fc.in_features, classes)
    torch.save(net.state_dict(), path)


def two_lite0_models(root: Path) -> Path:
    """``a`` and ``b``, both the packaged Lite0; ``b`` with a batch size and a labels file of its own."""
    write_model(root, "a", 'variant = "efficientnet-lite0"\nmax_batch_size = 2\n')
    b = write_model(root, "b", 'variant = "efficientnet-lite0"\nmax_batch_size = 4\nlabels = "labels.txt"\n')
    (b / "labels.txt").write_text("\n".join(B_LABELS) + "\n")
    return root
