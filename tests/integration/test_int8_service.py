"""The real server with EFFNET_DTYPE=int8: quantises on the calibration folder at the first start, answers
the shared photos with the classes float32 finds, reports precision, calibration set and cache hit in
/info; the second start takes the model from the cache; an unusable calibration folder is one clear
start-up error and exit code 1."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.calibration import make_calibration_dir


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    return make_calibration_dir(tmp_path_factory.mktemp("calibration"), count=40, seed=2)


def _top1(url: str, photos: dict[str, bytes]) -> dict[str, str]:
    files = [("file", (name, data, "image/jpeg")) for name, data in photos.items()]
    answer = httpx.post(f"{url}/predict", files=files, params={"top_k": 1}, timeout=60)
    assert answer.status_code == 200, answer.text
    return {r["filename"]: r["top_k"][0]["label"] for r in answer.json()["results"]}


def test_int8_service_quantises_once_then_starts_from_the_cache(start_service, calibration_dir, tmp_path, photos,
                                                                 photo_classes):
    env = {"EFFNET_DTYPE": "int8", "EFFNET_CALIBRATION_DIR": str(calibration_dir),
           "EFFNET_CACHE_DIR": str(tmp_path / "cache")}
    first = start_service(env)
    info = httpx.get(f"{first.url}/info").json()
    assert info["precision"] == "int8" and info["dtype"] == "int8" and info["backend"] == "onnxruntime"
    quantization = info["quantization"]
    assert quantization["source"] == "calibrated" and quantization["cache_hit"] is False
    assert quantization["calibration_count"] == 40 and len(quantization["calibration_sha256"]) == 64
    assert 0.0 <= quantization["held_out_agreement"] <= 1.0
    int8_top1 = _top1(first.url, photos)
    assert first.terminate() == 0

    second = start_service(env)
    again = httpx.get(f"{second.url}/info").json()["quantization"]
    assert again["cache_hit"] is True and again["cache_file"] == quantization["cache_file"]
    assert _top1(second.url, photos) == int8_top1
    assert second.terminate() == 0

    # The float32 service, same photos: the same top-1 for each (and each among the expected classes).
    float_service = start_service({})
    assert httpx.get(f"{float_service.url}/info").json()["precision"] == "float32"
    assert _top1(float_service.url, photos) == int8_top1
    for name, label in int8_top1.items():
        if name != "grace_hopper.jpg":  # its top-1 is one of several acceptable ones
            assert label in photo_classes[name], (name, label)
    assert float_service.terminate() == 0


@pytest.mark.parametrize("case", ["empty", "missing", "all bad"])
def test_unusable_calibration_folder_exits_1_with_one_clear_line(start_service, tmp_path, case):
    folder = tmp_path / "photos"
    if case != "missing":
        folder.mkdir()
    if case == "all bad":
        for i in range(40):
            (folder / f"{i:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    expected = {"empty": "is empty", "missing": "does not exist", "all bad": "has 0 readable photos"}[case]
    service = start_service({"EFFNET_DTYPE": "int8", "EFFNET_CALIBRATION_DIR": str(folder),
                             "EFFNET_CACHE_DIR": str(tmp_path / "cache")}, wait=False)
    assert service.wait_exit(timeout=120) == 1
    logs = service.logs()
    errors = [line for line in logs.splitlines() if '"level": "ERROR"' in line]
    assert len(errors) == 1, logs
    assert expected in errors[0] and "EFFNET_CALIBRATION_DIR" in errors[0], errors[0]
    assert "Traceback" not in logs
