"""The grad-cam package (pytorch-grad-cam, MIT) as the reference for class activation maps.

Its ``GradCAM`` runs the PyTorch model forward and backward and weighs the target layer's activations by
their gradients. Here the target layer is the network's head activation (``_head_swish``: the feature map
the features pool), and the result is kept on that layer's grid: ``get_target_width_height`` answers None,
so grad-cam min-max scales its map without resizing it to the input. grad-cam imports torchvision, which
``tests.helpers.foreign`` makes importable beside the CPU torch.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers.components import missing_component
from tests.helpers.foreign import _import_torchvision


def grad_cam_module():
    _import_torchvision()
    try:
        import pytorch_grad_cam
    except ImportError:
        missing_component("grad-cam is not installed (pip install -e '.[dev]')")
    return pytorch_grad_cam


def grad_cam_grids(net: torch.nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """grad-cam's GradCAM of ``net`` (float32, eval) on the normalised batch ``x`` (N, 3, S, S), for class
    ``classes[i]`` of image i, on the head's grid: N x h x w in [0, 1] (its own min-max scaling)."""
    cams = grad_cam_module()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class GridGradCAM(cams.GradCAM):
        def get_target_width_height(self, input_tensor):  # noqa: ANN001 - grad-cam's signature
            return None  # keep the map on the target layer's grid

    with GridGradCAM(model=net, target_layers=[net._head_swish]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over their cells (1.0 when both are the same constant)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 and b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])
