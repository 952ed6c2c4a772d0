"""Draft JPEG decoding is a speed-up only: it keeps the full decode's top-1 on real photos."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from model import EfficientNet, Normalize, default_weights_path, preprocess_image
from service.core.imaging import DRAFT_OVERSAMPLE, Preprocessor


@pytest.fixture(scope="module")
def lite0():
    return EfficientNet.from_pretrained("efficientnet-lite0", default_weights_path("efficientnet-lite0")).eval()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.mark.parametrize("name", ["coffee.jpg", "chelsea.jpg", "grace_hopper.jpg"])
@pytest.mark.parametrize("scale", [1, 4])
def test_draft_decoding_keeps_top1(lite0, data_dir, name, scale):
    data = (data_dir / name).read_bytes()
    full = Image.open(io.BytesIO(data))
    if scale != 1:  # a large photo, so that draft decoding really scales down in the DCT
        full = full.convert("RGB").resize((full.width * scale, full.height * scale), Image.Resampling.BICUBIC)
        data = _jpeg(full)
    pp = lite0.variant.preprocess
    pre = Preprocessor(pp, max_pixels=10**8)

    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (DRAFT_OVERSAMPLE * pp.resize_size,) * 2)
    if scale != 1:
        assert drafted.size[0] < full.width, "the test must exercise a reduced (draft) decode"

    reference = preprocess_image(Image.open(io.BytesIO(data)).convert("RGB"), pp)  # full decode
    served = Normalize(pp)(torch.from_numpy(pre(data))[None])[0]  # what the engines compute from uint8
    with torch.inference_mode():
        logits = lite0(torch.stack([reference, served]))
    assert logits[0].argmax() == logits[1].argmax()
    assert torch.softmax(logits, 1).sub(torch.softmax(logits, 1)[0]).abs().max() < 0.05
