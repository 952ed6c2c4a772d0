"""service.ray_data without a cluster: the predictor is a plain class that Ray Data calls with batches, so its
rows, its errors and its choice of model are checked here in-process (the cluster runs are in
tests/integration/test_batch_ray.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.helpers.components import missing_component
from tests.helpers.images import load_photos
from tests.helpers.repository import B_LABELS, two_lite0_models

try:
    import ray.data  # noqa: F401 - the predictor's tensor columns are Ray Data's
except ImportError:
    missing_component("ray[data] is not installed (pip install '.[ray]'; make test installs it)")

from service.core.errors import StartupError  # noqa: E402
from service.ray_data import EfficientNetPredictor, decode_images, model_spec  # noqa: E402

PHOTOS = load_photos()
TORCH = {"backend": "torch", "num_threads": 1, "warmup": False}  # the quickest engine to build here


def test_model_spec_chooses_the_model_as_the_server_does(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFNET_MODEL_REPOSITORY", raising=False)
    root = two_lite0_models(tmp_path / "models")
    spec, server = model_spec("b", model_repository=str(root))
    assert spec.name == "b" and spec.settings.max_batch_size == 4
    assert Path(spec.settings.labels) == root / "b" / "labels.txt"
    assert server.model_repository == str(root)
    with pytest.raises(ValueError, match="holds 2 models"):
        model_spec(model_repository=str(root))
    with pytest.raises(ValueError, match="no model 'c'"):
        model_spec("c", model_repository=str(root))
    with pytest.raises(ValueError, match="model=NAME only"):
        model_spec("b", weights="w.pth", model_repository=str(root))
    with pytest.raises(StartupError, match="EFFNET_WEIGHTS"):  # the repository's own refusal
        model_spec("b", model_repository=str(root), settings={"weights": "w.pth"})

    spec, _ = model_spec("efficientnet-b0", "birds.pth", labels="birds.txt", settings={"max_batch_size": 16})
    assert (spec.name, spec.settings.model, spec.settings.weights, spec.settings.labels) == (
        None, "efficientnet-b0", "birds.pth", "birds.txt")
    assert spec.settings.max_batch_size == 16 and not spec.settings.is_resolved
    with pytest.raises(ValueError, match="unknown setting.*max_batchsize"):
        model_spec(settings={"max_batchsize": 16})
    with pytest.raises(ValueError, match="either as a ModelSpec"):
        model_spec("efficientnet-b0", spec=spec)


@pytest.mark.slow
def test_rows_of_a_batch_of_bytes_and_of_decoded_pixels():
    """Bytes in (as read_binary_files gives them): the classes /predict gives, an error row for what is no
    image, other columns passed through. The same images decoded apart (decode_images, pyarrow batches)
    give the same rows."""
    predictor = EfficientNetPredictor(top_k=3, settings=TORCH)
    batch = {"bytes": np.array([PHOTOS["coffee.jpg"], b"<html>", PHOTOS["chelsea.jpg"]], dtype=object),
             "path": np.array(["coffee.jpg", "page.jpg", "chelsea.jpg"], dtype=object),
             "sku": np.array([11, 12, 13])}
    out = predictor(batch)
    assert out.column_names == ["path", "sku", "top_k", "error"]
    assert out.column("sku").to_pylist() == [11, 12, 13]
    rows = out.to_pylist()
    assert [c["label"] for c in rows[0]["top_k"]][0] == "espresso" and rows[0]["error"] is None
    assert [c["index"] for c in rows[2]["top_k"]] == [282, 285, 281]
    assert rows[1]["top_k"] is None and rows[1]["error"]["code"] == "invalid_image"

    decoded = decode_images(pa.table({"bytes": pa.array(list(batch["bytes"]), pa.binary()),
                                      "path": pa.array(list(batch["path"]))}),
                            preprocess=predictor.model.preprocess, max_pixels=predictor.server.max_image_pixels)
    assert decoded.column_names == ["path", "pixels", "error"]
    again = predictor(decoded).to_pylist()
    assert [r["error"] for r in again] == [r["error"] for r in rows]
    assert [r["top_k"] for r in again] == [r["top_k"] for r in rows]


@pytest.mark.slow
def test_embeddings_and_the_refusals_of_a_predictor():
    predictor = EfficientNetPredictor(task="features", normalize=True, settings=TORCH)
    out = predictor({"bytes": np.array([PHOTOS["coffee.jpg"], b""], dtype=object)})
    assert out.schema.field("embedding").type == pa.list_(pa.float64(), 1280)
    first, empty = out.column("embedding").to_pylist()
    assert abs(np.linalg.norm(first) - 1.0) < 1e-9 and empty is None
    assert out.column("error").to_pylist()[1]["code"] == "invalid_image"
    with pytest.raises(ValueError, match="'bytes' column"):
        predictor({"path": np.array(["a.jpg"], dtype=object)})
    with pytest.raises(ValueError, match="task must be one of"):
        EfficientNetPredictor(task="classify", settings=TORCH)
    with pytest.raises(Exception, match="top_k"):
        EfficientNetPredictor(top_k=1001, settings=TORCH)


@pytest.mark.slow
def test_labels_of_a_repository_model_reach_the_rows(tmp_path):
    """A repository model's own labels file (``b``'s "b-class N") names its classes."""
    root = two_lite0_models(tmp_path / "models")
    predictor = EfficientNetPredictor("b", model_repository=str(root), top_k=1, settings=TORCH)
    row = predictor({"bytes": np.array([PHOTOS["coffee.jpg"]], dtype=object)}).to_pylist()[0]
    assert row["top_k"][0]["label"] == B_LABELS[967]
