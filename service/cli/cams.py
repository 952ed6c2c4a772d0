"""``efficientnet-batch predict --cam DIR``: each image's class activation map (of its top-1 class), drawn
over the photo as ``DIR/<path>.png`` and kept as ``DIR/<path>.npy`` (h x w float32 in [0, 1]).

The file names mirror the image's path under DIR (an absolute path loses its leading ``/``, a ``..`` becomes
``__``), so images of the same name in different folders never overwrite each other. Drawing happens in a
thread (Pillow; the core's ``overlay_png``), off the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePath

import numpy as np

from service.core.cam import overlay_png
from service.core.imaging import Crop


class CamWriter:
    """Writes the overlay and the map of each image under ``folder`` (created)."""

    def __init__(self, folder: str, *, max_pixels: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_pixels = max_pixels

    def target(self, path: str) -> Path:
        parts = [("__" if part == ".." else part) for part in PurePath(path).parts
                 if part not in ("/", "\\", ".") and not part.endswith(":\\")]
        return self.folder.joinpath(*parts) if parts else self.folder / "image"

    async def write(self, path: str, data: bytes, grid: np.ndarray, crop: Crop) -> str:
        """Draw and save; the PNG's path (as a string, for the result row)."""
        return await asyncio.to_thread(self._write, path, data, grid, crop)

    def _write(self, path: str, data: bytes, grid: np.ndarray, crop: Crop) -> str:
        base = self.target(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        png = base.with_name(base.name + ".png")
        png.write_bytes(overlay_png(data, grid, crop, max_pixels=self.max_pixels))
        np.save(base.with_name(base.name + ".npy"), np.asarray(grid, dtype=np.float32))
        return str(png)


__all__ = ["CamWriter"]
