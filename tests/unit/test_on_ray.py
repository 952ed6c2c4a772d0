"""efficientnet-batch --ray's decisions that need no cluster: the command line, the size of the actor pool,
the sentence a failure of the job becomes, and the rows an actor's table becomes."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pytest

from service.cli.main import build_parser
from service.cli.on_ray import Pool, check_arguments, explain, rows, size_pool
from service.cli.results import FatalError


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["predict", "photos", "-o", "out.jsonl", *argv])


def test_the_command_line_of_a_ray_run(tmp_path):
    assert parse("--ray").ray == "local" and check_arguments(parse("--ray")) is None
    assert parse("--ray", "auto").ray == "auto" and check_arguments(parse("--ray=ray://head:10001")) is None
    assert check_arguments(parse("--ray", "10.0.0.5:6379", "--ray-actors", "4")) is None
    assert check_arguments(parse()) is None
    assert "applies with --ray" in check_arguments(parse("--ray-actor-cpus", "2"))
    assert "choose one" in check_arguments(parse("--ray", "--server", "http://x:8000"))
    assert "--ray-actors" in check_arguments(parse("--ray", "--concurrency", "4"))
    # `--ray photos/`: the folder taken as the address, said so rather than "cannot connect"
    folder = tmp_path / "photos"
    folder.mkdir()
    args = build_parser().parse_args(["predict", "-o", "out.jsonl", "--ray", str(folder), "x.jpg"])
    assert "put --ray after the paths" in check_arguments(args)


def sized(*argv: str, cpus=(8.0, 8.0), gpus=0.0, device="auto", threads=None) -> Pool:
    resources = {"CPU": sum(cpus), **({"GPU": gpus} if gpus else {})}
    return size_pool(parse("--ray", "auto", *argv), resources, list(cpus), device, threads)


def test_the_pool_fits_the_cluster():
    assert sized() == Pool(actors=2, cpus=4.0, gpus=0.0)  # half of 16 CPUs in actors of half a node (max 4)
    assert sized(threads=2) == Pool(actors=4, cpus=2.0, gpus=0.0)  # EFFNET_NUM_THREADS sets the actor's CPUs
    assert sized("--ray-actors", "3", "--ray-actor-cpus", "1") == Pool(3, 1.0, 0.0)
    assert sized(cpus=(0.0, 2.0)) == Pool(1, 1.0, 0.0)  # a head of 0 CPUs is not the smallest node
    assert sized(cpus=(16.0, 16.0), gpus=4) == Pool(actors=4, cpus=1.0, gpus=1.0)  # one actor per GPU
    assert sized(cpus=(16.0,), gpus=1, device="cpu").gpus == 0.0  # EFFNET_DEVICE=cpu keeps off the GPUs
    assert sized("--ray-actor-gpus", "0.5", cpus=(16.0,), gpus=1) == Pool(2, 1.0, 0.5)
    assert sized("--ray-actors", "9", cpus=(2.0, 2.0)) == Pool(3, 1.0, 0.0)  # always a CPU left to decode
    with pytest.raises(FatalError, match="no CPU|the cluster has 1 CPUs"):
        sized(cpus=(1.0,))  # the actor would hold the only CPU: nothing could decode
    with pytest.raises(FatalError, match="lower --ray-actor-cpus"):
        sized("--ray-actor-cpus", "12")
    with pytest.raises(FatalError, match="asks for 1 GPU"):
        sized("--ray-actor-gpus", "1")


def test_a_failure_of_the_job_is_one_sentence():
    class RayTaskError(Exception):
        pass

    remote = RayTaskError("ray::MapBatches(read_and_decode)() (pid=1, ip=10.0.0.5)\n  File \"x.py\", line 8\n"
                          "KeyError: \"no column 'file'\"\n\nThe above exception was the direct cause of the "
                          "following exception:\n\nray.exceptions.UserCodeException: UDF failed to process a "
                          "data block.")
    assert explain(remote) == "the Ray job failed: KeyError: \"no column 'file'\""
    actor = RayTaskError("ray::MapWorker.__init__()\nservice.core.errors.StartupError: weights file not found: "
                         "/mnt/b.pth\n")
    assert explain(actor) == "an inference actor could not load the model: weights file not found: /mnt/b.pth"
    assert explain(ConnectionError("GCS lost\ndetails")) == "the Ray job failed: ConnectionError: GCS lost"


def test_an_actors_table_becomes_the_rows_of_a_local_run():
    error = pa.struct([("code", pa.string()), ("message", pa.string())])
    top_k = [[{"index": 967, "label": "espresso", "score": 0.95}], None]
    table = pa.table({"path": ["a.jpg", "b.jpg"], "top_k": pa.array(top_k, pa.list_(pa.struct(
        [("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())]))),
        "error": pa.array([None, {"code": "invalid_image", "message": "not an image"}], error)})
    first, second = rows(table, "predict")
    assert first.as_json() == {"path": "a.jpg", "top_k": [{"index": 967, "label": "espresso", "score": 0.95}]}
    assert second.as_json() == {"path": "b.jpg", "error": {"code": "invalid_image", "message": "not an image"}}

    values = np.arange(12, dtype=np.float64)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(values), 4, mask=pa.array([False, True, False]))
    table = pa.table({"path": ["a", "b", "c"], "embedding": embedding,
                      "error": pa.array([None, {"code": "x", "message": "y"}, None], error)}).slice(1)
    second, third = rows(table, "features")  # a slice: the values start past the array's offset
    assert second.error == {"code": "x", "message": "y"} and second.embedding is None
    np.testing.assert_array_equal(third.embedding, [8.0, 9.0, 10.0, 11.0])
