"""A calibration folder built from the three test photos: crops, flips, turns and colour changes.

Quantisation needs at least 32 photos; a quick test cannot ship hundreds. Augmented views of the real
photos keep the activation ranges realistic (a folder of noise would calibrate a different model).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from tests.helpers.images import DATA, PHOTO_NAMES


def make_calibration_dir(folder: Path, count: int = 40, seed: int = 0) -> Path:
    """Write ``count`` JPEG views of the test photos into ``folder`` (created); return it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    photos = [Image.open(DATA / name).convert("RGB") for name in PHOTO_NAMES]
    for i in range(count):
        image = photos[i % len(photos)]
        w, h = image.size
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        view = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        if rng.random() < 0.2:
            view = view.rotate(rng.choice([90, 270]), expand=True)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
        view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
        if rng.random() < 0.15:
            view = ImageOps.grayscale(view).convert("RGB")
        view.save(folder / f"view-{i:03d}.jpg", quality=90)
    return folder
