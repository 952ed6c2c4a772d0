"""efficientnet-batch in-process: finding images, one row per image as /predict answers it, output formats.

The command runs in this process (``main([...])``) with the real Lite0 model, loaded once for the module.
Server mode is in test_batch_cli_server.py; interrupting real processes in tests/integration.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli.discover import discover, looks_like_image
from service.cli.main import main
from service.cli.progress import LineReporter
from service.cli.results import Result
from service.cli.sinks import JsonlSink, NpySink, ParquetSink, paths_file
from service.core import registry
from tests.helpers.images import DATA, load_photos
from tests.helpers.server import REPO

pytestmark = pytest.mark.slow  # builds the real Lite0 network


@pytest.fixture(scope="module")
def lite0():
    """The real Lite0 model (packaged weights), loaded once; the command's loader hands it out."""
    from service.core.loading import load_model
    from service.core.settings import ModelSettings

    return load_model(ModelSettings(model="efficientnet-lite0", num_threads=2, warmup=False))


@pytest.fixture(autouse=True)
def _shared_model(monkeypatch, lite0):
    """Every in-process run serves this one Lite0 (as the spec the run asks for would name it)."""
    import dataclasses

    def load(spec):
        assert spec.settings.model == "efficientnet-lite0", "these tests use Lite0"
        return dataclasses.replace(lite0, spec=dataclasses.replace(lite0.spec, name=spec.name))

    monkeypatch.setattr(registry, "load_model", load)


def image_bytes(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 128).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Good photos (one without an extension, one nested two deep), bad files claiming to be images, and
    files that are not images at all."""
    photos = load_photos()
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "coffee.jpg").write_bytes(photos["coffee.jpg"])
    (root / "chelsea.jpg").write_bytes(photos["chelsea.jpg"])
    (root / "nested" / "grace_hopper.jpg").write_bytes(photos["grace_hopper.jpg"])
    (root / "nested" / "deeper" / "IMG_0001").write_bytes(photos["coffee.jpg"])  # no extension: by content
    (root / "broken.jpg").write_text("this is not a JPEG")
    (root / "nested" / "truncated.jpg").write_bytes(photos["chelsea.jpg"][:3000])
    (root / "empty.png").write_bytes(b"")
    (root / "README.txt").write_text("photos for the test")
    (root / "labels.csv").write_text("a,b\n")
    (root / ".hidden.jpg").write_bytes(photos["coffee.jpg"])
    return root


GOOD = {"coffee.jpg", "chelsea.jpg", "nested/grace_hopper.jpg", "nested/deeper/IMG_0001"}
BAD = {"broken.jpg", "nested/truncated.jpg", "empty.png"}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def relative(rows: list[dict], root: Path) -> dict[str, dict]:
    return {os.path.relpath(r["path"], root): r for r in rows}


# ---- finding images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_every_supported_format_is_recognised_by_its_first_bytes(fmt):
    """Signature sniffing knows each format the service decodes (the files Pillow itself writes)."""
    assert looks_like_image(image_bytes(fmt)[:32])


def test_text_is_not_taken_for_an_image():
    """Text, including text that starts like a BMP ("BM..."), is not an image signature."""
    assert not looks_like_image(b"BMW service notes, 2026\n")
    assert not looks_like_image(b"a,b,c\n1,2,3\n")
    assert not looks_like_image(b"")


def test_discover_walks_folders_and_recognises_images_by_content(folder, tmp_path):
    """Recursive, sorted, by extension or content; non-images ignored and counted; dot-files skipped;
    a file named on the command line is always taken, and a missing PATH is reported."""
    stray = tmp_path / "notes.txt"
    stray.write_text("named explicitly")
    found = discover([str(folder), str(stray), str(folder / "coffee.jpg"), str(tmp_path / "nope")])
    names = [os.path.relpath(p, folder) for p in found.images]
    assert set(names) == GOOD | BAD | {os.path.relpath(stray, folder)}
    assert len(names) == len(set(names)), "coffee.jpg given twice must appear once"
    assert names.index("broken.jpg") < names.index("nested/deeper/IMG_0001")  # sorted walk
    assert found.ignored == 2  # README.txt, labels.csv
    assert found.missing == [str(tmp_path / "nope")]


def test_links_to_folders_are_not_followed(folder):
    """A symbolic link back to an ancestor would make the walk endless; it is not followed."""
    os.symlink(folder, folder / "nested" / "loop")
    found = discover([str(folder)])
    assert len(found.images) == len(GOOD | BAD)


# ---- one row per image, as /predict answers ----------------------------------------------------------------
def test_folder_gives_one_row_per_image_with_the_labels_of_predict(folder, tmp_path, lite0, capsys):
    """Good, bad and nested images: one row each; good rows hold the same classes as POST /predict of the
    in-process app with the same model; bad ones an error row with the service's code; exit status 1."""
    from fastapi.testclient import TestClient

    from service.core.registry import Startup
    from service.core.settings import ServerSettings
    from service.server.app import create_app

    out = tmp_path / "results.jsonl"
    code = main(["predict", str(folder), "--output", str(out), "--top-k", "3"])
    assert code == 1  # some images failed
    rows = relative(rows_of(out), folder)
    assert set(rows) == GOOD | BAD
    with TestClient(create_app(ServerSettings(), startup=Startup(None, [lite0]))) as client:
        for name in GOOD:
            answer = client.post("/predict", params={"top_k": 3}, content=(folder / name).read_bytes(),
                                 headers={"Content-Type": "application/octet-stream"})
            assert answer.status_code == 200
            expected = answer.json()["results"][0]["top_k"]
            got = rows[name]["top_k"]
            assert [(c["index"], c["label"]) for c in got] == [(c["index"], c["label"]) for c in expected]
            assert [c["score"] for c in got] == pytest.approx([c["score"] for c in expected], rel=1e-4)
    assert rows["coffee.jpg"]["top_k"][0]["label"] == "espresso"
    for name in BAD:
        assert set(rows[name]) == {"path", "error"}
        assert rows[name]["error"]["code"] == "invalid_image"
    assert rows["empty.png"]["error"]["message"] == "empty image"
    err = capsys.readouterr().err
    assert f"error: {folder / 'broken.jpg'}: not a supported image" in err
    assert "7 images in" in err and "4 ok, 3 errors" in err and "2 non-image files ignored" in err


def test_exit_status_is_zero_when_every_image_succeeded(tmp_path):
    """Every image classified: exit 0, and the summary says so."""
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(DATA / "coffee.jpg"), str(DATA / "chelsea.jpg"), "-o", str(out), "-q"]) == 0
    assert len(rows_of(out)) == 2


def test_unreadable_file_is_an_error_row(tmp_path):
    """A file that cannot be read (here a link whose target is gone) is one error row; the others still
    run."""
    dangling = tmp_path / "gone.jpg"
    os.symlink(tmp_path / "deleted.jpg", dangling)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(dangling), str(DATA / "coffee.jpg"), "-o", str(out), "-q"]) == 1
    rows = {r["path"]: r for r in rows_of(out)}
    assert rows[str(dangling)]["error"] == {"code": "unreadable",
                                            "message": "cannot read file: No such file or directory"}
    assert rows[str(DATA / "coffee.jpg")]["top_k"][0]["label"] == "espresso"


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    """EFFNET_MAX_BODY_BYTES bounds what is read into memory, as it bounds the server's uploads."""
    monkeypatch.setenv("EFFNET_MAX_BODY_BYTES", "2048")
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(out), "-q"]) == 1
    (row,) = rows_of(out)
    assert row["error"]["code"] == "body_too_large"
    assert "the limit is 2048" in row["error"]["message"]


# ---- output formats ----------------------------------------------------------------------------------------
def test_features_round_trip_through_jsonl_npy_and_parquet(folder, tmp_path):
    """The same embeddings in all three formats: .jsonl (float64 lists), .npy (float32 rows, paths beside
    it; errors have no row), .parquet (fixed-size list of float32); normalised to unit length."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    outs = {ext: tmp_path / f"emb.{ext}" for ext in ("jsonl", "npy", "parquet")}
    for out in outs.values():
        assert main(["features", str(folder), "-o", str(out), "--normalize", "-q"]) == 1
    by_path = {r["path"]: r for r in rows_of(outs["jsonl"])}
    assert len(by_path) == len(GOOD | BAD)
    good = {p: np.asarray(r["embedding"]) for p, r in by_path.items() if "embedding" in r}
    assert len(good) == len(GOOD)
    for vector in good.values():
        assert vector.shape == (1280,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)

    matrix = np.load(outs["npy"])
    listed = paths_file(outs["npy"]).read_text().splitlines()
    assert matrix.dtype == np.float32 and matrix.shape == (len(GOOD), 1280)
    assert sorted(listed) == sorted(good)
    for row, path in zip(matrix, listed, strict=True):
        np.testing.assert_allclose(row, good[path], rtol=1e-4, atol=1e-6)

    table = pq.read_table(outs["parquet"])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    assert table.num_rows == len(GOOD | BAD)
    for row in table.to_pylist():
        if row["error"] is None:
            np.testing.assert_allclose(row["embedding"], good[row["path"]], rtol=1e-4, atol=1e-6)
        else:
            assert row["embedding"] is None and row["error"]["code"] == "invalid_image"


def test_predictions_round_trip_through_parquet(folder, tmp_path):
    """top_k as a list of struct(index, label, score), identical to the .jsonl rows of the same images."""
    jsonl, parquet = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    for out in (jsonl, parquet):
        main(["predict", str(folder), "-o", str(out), "-q", "--top-k", "2"])
    import pyarrow.parquet as pq

    from_parquet = {r["path"]: r for r in pq.read_table(parquet).to_pylist()}
    for row in rows_of(jsonl):
        other = from_parquet[row["path"]]
        if "error" in row:
            assert other["error"] == row["error"] and other["top_k"] is None
        else:
            assert [c["label"] for c in other["top_k"]] == [c["label"] for c in row["top_k"]]
            assert [c["score"] for c in other["top_k"]] == pytest.approx([c["score"] for c in row["top_k"]])


def test_stdout_output_is_json_lines(capsys):
    """``--output -`` writes the rows to stdout (for a pipe into jq); progress stays on stderr."""
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", "-", "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    assert row["top_k"][0]["label"] == "espresso"
    assert "1 ok" in captured.err


def test_npy_file_is_valid_after_every_row_and_resume_drops_torn_rows(tmp_path):
    """The .npy header is rewritten per row, so the file loads mid-run; after a hard kill tore the last row
    and its path line, --resume keeps only the rows that have both."""
    out = tmp_path / "e.npy"
    sink = NpySink(str(out), dim=4)
    for i in range(3):
        sink.write(Result(f"img{i}.jpg", embedding=np.full(4, i, dtype=np.float64)))
        assert np.load(out).shape == (i + 1, 4)  # readable while the run goes on
    sink.write(Result("bad.jpg", error={"code": "invalid_image", "message": "x"}))
    sink.close()
    with open(out, "ab") as f:
        f.write(b"\x00" * 6)  # a torn fourth row
    with open(paths_file(out), "a") as f:
        f.write("img3.jp")  # a torn fourth path
    resumed = NpySink(str(out), dim=4, resume=True)
    assert resumed.done == {"img0.jpg", "img1.jpg", "img2.jpg"}
    resumed.write(Result("img3.jpg", embedding=np.full(4, 3.0)))
    resumed.close()
    np.testing.assert_array_equal(np.load(out), np.repeat(np.arange(4, dtype=np.float32), 4).reshape(4, 4))
    assert paths_file(out).read_text().splitlines() == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]


def test_npy_resume_refuses_another_dimension(tmp_path):
    out = tmp_path / "e.npy"
    sink = NpySink(str(out), dim=4)
    sink.close()
    from service.cli.sinks import OutputError

    with pytest.raises(OutputError, match="rows of 8"):
        NpySink(str(out), dim=8, resume=True)


def test_jsonl_resume_keeps_results_and_retries_errors_and_torn_lines(tmp_path):
    """Rows with a result are kept and skipped; error rows and a line torn by a kill are removed so those
    paths run again and every path ends with exactly one row."""
    out = tmp_path / "r.jsonl"
    good = {"path": "a.jpg", "top_k": [{"index": 1, "label": "x", "score": 1.0}]}
    bad = {"path": "b.jpg", "error": {"code": "overloaded", "message": "queue full"}}
    out.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n" + '{"path": "c.jpg", "top_')
    sink = JsonlSink(str(out), "predict", resume=True)
    assert sink.done == {"a.jpg"} and sink.retried == 1
    sink.write(Result("b.jpg", top_k=[{"index": 2, "label": "y", "score": 0.5}]))
    sink.close()
    assert [r["path"] for r in rows_of(out)] == ["a.jpg", "b.jpg"]


def test_resume_refuses_the_other_commands_output(tmp_path):
    """Resuming an embeddings file with 'predict' would mix two kinds of rows: refused (exit 2)."""
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"path": "a.jpg", "embedding": [0.0]}) + "\n")
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(out), "--resume", "-q"]) == 2


def test_parquet_resume_keeps_results_and_retries_errors(tmp_path):
    out = tmp_path / "r.parquet"
    sink = ParquetSink(str(out), "predict", dim=0)
    sink.write(Result("a.jpg", top_k=[{"index": 1, "label": "x", "score": 1.0}]))
    sink.write(Result("b.jpg", error={"code": "invalid_image", "message": "no"}))
    sink.close()
    assert not out.with_name("r.parquet.partial").exists()
    resumed = ParquetSink(str(out), "predict", dim=0, resume=True)
    assert resumed.done == {"a.jpg"} and resumed.retried == 1
    resumed.write(Result("b.jpg", top_k=[{"index": 2, "label": "y", "score": 0.5}]))
    resumed.close()
    import pyarrow.parquet as pq

    assert [r["path"] for r in pq.read_table(out).to_pylist()] == ["a.jpg", "b.jpg"]


def test_resume_skips_the_paths_already_done(folder, tmp_path, capsys):
    """A second run with --resume classifies only what the first did not finish (here: its errors)."""
    out = tmp_path / "r.jsonl"
    main(["predict", str(folder), "-o", str(out)])
    capsys.readouterr()
    assert main(["predict", str(folder), "-o", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "3 images in" in err and "4 already done" in err and "3 earlier errors tried again" in err
    assert len(rows_of(out)) == len(GOOD | BAD)


def test_existing_output_is_not_replaced_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.write_text("precious\n")
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(out), "--overwrite", "-q"]) == 0
    assert rows_of(out)[0]["path"] == str(DATA / "coffee.jpg")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "{data}", "-o", "{tmp}/r.csv"], "output format"),
        (["predict", "{data}", "-o", "{tmp}/r.npy"], ".npy holds embeddings"),
        (["predict", "{tmp}/missing", "-o", "{tmp}/r.jsonl"], "no such file or folder"),
        (["predict", "{data}", "-o", "{tmp}/r.jsonl", "--top-k", "1001"], "1000 classes"),
        (["predict", "{data}", "-o", "-", "--resume"], "stdout"),
        (["features", "{data}", "-o", "{tmp}/r.jsonl", "--server", "http://x", "--weights", "{tmp}/w.pth"],
         "in-process"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(argv, message, tmp_path, capsys):
    argv = [a.format(data=DATA / "coffee.jpg", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_setting_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """The EFFNET_* settings are validated as the server validates them."""
    monkeypatch.setenv("EFFNET_MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(DATA / "coffee.jpg"), "-o", str(tmp_path / "r.jsonl")])
    assert exit_.value.code == 2
    assert "EFFNET_MAX_BATCH_SIZE" in capsys.readouterr().err


# ---- a model repository (EFFNET_MODEL_REPOSITORY) in-process ---------------------------------------------------
@pytest.fixture()
def repository(tmp_path, monkeypatch, lite0) -> tuple[Path, list]:
    """EFFNET_MODEL_REPOSITORY with two Lite0 models, ``a`` and ``b`` (b with its own batch size and labels
    file); the loader records the settings it is asked to load and hands out the shared Lite0."""
    root = tmp_path / "models"
    for name, toml in (("a", "max_batch_size = 2\n"), ("b", 'max_batch_size = 3\nlabels = "labels.txt"\n')):
        (root / name).mkdir(parents=True)
        (root / name / "model.toml").write_text('variant = "efficientnet-lite0"\n' + toml)
    (root / "b" / "labels.txt").write_text("".join(f"b-class {i}\n" for i in range(1000)))
    loads: list = []

    def load(spec):
        import dataclasses

        loads.append(spec.settings)
        return dataclasses.replace(lite0, spec=spec)

    monkeypatch.setattr(registry, "load_model", load)
    monkeypatch.setenv("EFFNET_MODEL_REPOSITORY", str(root))
    return root, loads


def test_model_names_a_repository_model_in_process(repository, tmp_path, capsys):
    """With a repository, --model NAME loads that model from its model.toml (its batch size, its labels
    file), and the run is described by the model's name."""
    root, loads = repository
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(out), "--model", "b"]) == 0
    (settings,) = loads
    assert settings.max_batch_size == 3
    assert settings.labels == str((root / "b" / "labels.txt").resolve())
    assert "predict with b (efficientnet-lite0) in-process" in capsys.readouterr().err
    assert len(rows_of(out)) == 1


def test_the_repositorys_default_model_is_loaded_without_model(repository, tmp_path, monkeypatch):
    """No --model: EFFNET_DEFAULT_MODEL, as a server of the same settings would choose."""
    _, loads = repository
    monkeypatch.setenv("EFFNET_DEFAULT_MODEL", "a")
    assert main(["predict", str(DATA / "coffee.jpg"), "-o", str(tmp_path / "r.jsonl"), "-q"]) == 0
    assert [s.max_batch_size for s in loads] == [2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "the model repository {root} holds several models (a, b): name one with --model NAME"),
        (["--model", "efficientnet-b0"], "--model efficientnet-b0: no such model in the repository {root} (it has: "
                                         "a, b)"),
        (["--model", "../a"], "--model ../a: no such model"),
        (["--model", "a", "--weights", "{tmp}/w.pth"], "--weights describes a single model"),
    ],
)
def test_repository_mistakes_are_usage_errors_before_any_load(repository, extra, message, tmp_path, capsys):
    """With a repository --model never falls back to a variant; nothing is loaded when it names no model."""
    root, loads = repository
    argv = ["predict", str(DATA / "coffee.jpg"), "-o", str(tmp_path / "r.jsonl"),
            *(a.format(tmp=tmp_path) for a in extra)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message.format(root=root) in capsys.readouterr().err
    assert loads == []


# ---- progress ----------------------------------------------------------------------------------------------
def test_plain_progress_line_reports_done_total_rate_eta_and_errors():
    """Not a terminal: the periodic line says done/total, percent, images/s, errors and ETA."""
    stream = io.StringIO()
    reporter = LineReporter(stream, every=0.0)
    reporter.start(10, "predict")
    for ok in (True, True, False):
        reporter.advance(ok)
    reporter.tick()
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("efficientnet-batch: 3/10 (30%), ")
    assert "images/s, 1 error, ETA " in line


def test_quiet_prints_only_per_image_errors(folder, tmp_path, capsys):
    main(["predict", str(folder), "-o", str(tmp_path / "r.jsonl"), "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(BAD) and all(line.startswith("error: ") for line in lines)


def test_the_command_does_not_import_the_http_front_end():
    """In-process mode uses only the transport-free core: no FastAPI app, no service.http."""
    code = ("import sys, service.cli.main, service.cli.local, service.cli.remote, service.cli.sinks;"
            "bad = sorted(m for m in sys.modules if m.startswith(('service.http', 'fastapi', 'uvicorn')));"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
