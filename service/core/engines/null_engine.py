"""An engine that answers at once without computing (``EFFNET_BACKEND=null``): for measuring what the
front-ends of a host can feed, as Triton users do with an identity model and perf_analyzer.

Its outputs are zeros of the served model's shapes (every class equally likely, an all-zero embedding):
never an answer about an image. It is used only when named, the start-up log says so, and ``/info``'s
``backend`` is ``null``.
"""

from __future__ import annotations

import numpy as np

from service.core.engines.base import Engine


class NullEngine(Engine):
    backend = "null"

    def __init__(self, num_features: int, num_classes: int, device: str, image_size: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.device = device
        self.dtype = "float32"
        self.image_size = image_size

    def run(self, batch: np.ndarray, slot: int = 0, *, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        n = len(batch)
        outputs = (np.zeros((n, self.num_features), dtype=np.float32),
                   np.zeros((n, self.num_classes), dtype=np.float32))
        if feature_map:
            grid = -(-self.image_size // 32)
            outputs += (np.zeros((n, self.num_features, grid, grid), dtype=np.float32),)
        return outputs
