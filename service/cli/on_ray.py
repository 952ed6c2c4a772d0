"""``efficientnet-batch ... --ray [ADDRESS]``: the batch job as a Ray Data pipeline on a Ray cluster.

This process (the driver) does what a local run does around the model: it lists the files
(``service.cli.discover``), skips those the output already holds (``--resume``), writes each row as it
comes back, in the same formats, and shows the same progress and summary (``service.cli.main.Run``). The
cluster does the rest: CPU tasks read and decode the files, a few dozen per task (``read_and_decode``:
the reading rules of a local run, then the service's preprocessing), and an actor pool infers
(``service.ray_data.EfficientNetPredictor``: the model loaded once per actor, the service's engine).

A file that cannot be read or decoded is an error row, as in a local run, and the job goes on. A task or
actor lost with its node is redone by Ray Data (tasks are retried, actors restarted), and a row that
arrives twice is written once; a failure Ray cannot redo stops the run with one sentence, and
``--resume`` goes on from the rows written.

The files are read on the cluster's nodes: on a multi-node cluster, the paths must name the same files
on every node (a shared filesystem mounted at the same place) and the checkpoint and labels files too.
Only this module and ``service.ray_data`` import Ray, and only when a run asks for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from service.cli.results import FatalError, Result, failure

ROWS_PER_TASK = 32  # files one read-and-decode task takes: ~0.1-0.2 s of work, 5 MB of pixels out
ACTOR_BATCH = 64  # images per call of an inference actor (the engine runs them EFFNET_MAX_BATCH_SIZE at a time)
LOCAL = "local"  # --ray without an address: a cluster of this machine, started for the run


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The command's options for running on Ray (in the "where the model runs" group)."""
    group.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                       help="run the job on a Ray cluster (pip install 'effnet-serve[ray]'): 'auto' (the cluster "
                            "this machine belongs to), HOST:PORT or ray://HOST:10001; without ADDRESS, a cluster "
                            "of this machine started for the run. Put it after the paths (or write --ray=ADDRESS)")
    group.add_argument("--ray-actors", type=_positive_int, metavar="N",
                       help="with --ray: most inference actors (default: one per GPU, or half the cluster's CPUs "
                            "over --ray-actor-cpus)")
    group.add_argument("--ray-actor-cpus", type=_positive_int, metavar="N",
                       help="with --ray: CPUs, and inference threads, of each actor (default: $EFFNET_NUM_THREADS, "
                            "or half the smallest node's CPUs up to 4; 1 with GPUs)")
    group.add_argument("--ray-actor-gpus", type=float, metavar="G",
                       help="with --ray: GPUs of each actor (default: 1 when the cluster has GPUs and EFFNET_DEVICE "
                            "is not cpu; a fraction shares a GPU)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def check_arguments(args: argparse.Namespace) -> str | None:
    """Why the command line cannot run on Ray (a usage error), or None."""
    if args.ray is None:
        given = [name for name in ("ray_actors", "ray_actor_cpus", "ray_actor_gpus") if getattr(args, name)]
        return f"--{given[0].replace('_', '-')} applies with --ray" if given else None
    if args.server:
        return "--ray and --server are two places to run the model: choose one"
    if args.concurrency:
        return "--concurrency applies in-process and with --server; with --ray, size the pool with --ray-actors"
    if args.ray not in (LOCAL, "auto") and not args.ray.startswith("ray://") and (
            os.path.exists(args.ray) or ":" not in args.ray):
        return (f"--ray took {args.ray!r} as the cluster's address: write it as auto, HOST:PORT or ray://HOST:PORT, "
                "and put --ray after the paths (or write --ray=ADDRESS)")
    return None


# ---- on the cluster: reading and decoding -------------------------------------------------------------------
def _accept(path: str) -> str | None:
    return None  # the output's own refusals are applied by the driver, before the job


def read_and_decode(batch: Any, *, preprocess: Any, max_pixels: int, max_bytes: int,
                    read: Callable[..., list[tuple[str, bytes | Result]]]) -> Any:
    """A Ray Data task: the files (``file``, absolute: a worker's working folder is not the driver's) read
    as a local run reads them (``read``: the command's own reader; too large or unreadable is an error
    row) and decoded as the service decodes uploads, into ``pixels`` and ``error`` for
    ``EfficientNetPredictor``; ``path`` (as the row will name it) is passed on."""
    from service.core.imaging import Preprocessor
    from service.ray_data import decode_one, pixels_table

    files = batch.column("file").to_pylist()
    preprocessor = Preprocessor(preprocess, max_pixels=max_pixels)
    arrays, errors = [], []
    for _file, data in read(files, max_bytes, _accept, "EFFNET_MAX_BODY_BYTES"):
        array, error = (None, data.error) if isinstance(data, Result) else decode_one(preprocessor, data)
        arrays.append(array)
        errors.append(error)
    return pixels_table({"path": batch.column("path")}, arrays, errors, preprocessor.shape)


# ---- in the driver ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pool:
    """The inference actors: how many at most, and what each holds."""

    actors: int
    cpus: float
    gpus: float


def size_pool(args: argparse.Namespace, resources: dict[str, float], node_cpus: Sequence[float],
              device: str, num_threads: int | None) -> Pool:
    """One actor per GPU (1 CPU each) where the cluster has GPUs; on CPUs, actors of ``num_threads`` (or
    half the smallest node, up to 4) CPUs over half the cluster's CPUs, so that the other half decodes."""
    gpus = float(resources.get("GPU", 0))
    if args.ray_actor_gpus or (gpus >= 1 and device != "cpu"):
        per = args.ray_actor_gpus or 1.0
        if per > gpus:
            raise FatalError(f"each actor asks for {per:g} GPU(s) but the cluster has {gpus:g}")
        return Pool(args.ray_actors or max(1, int(gpus // per)), float(args.ray_actor_cpus or 1), per)
    working = [c for c in node_cpus if c > 0] or [0.0]  # a head of 0 CPUs only coordinates
    cpus = args.ray_actor_cpus or num_threads or max(1, min(4, int(min(working)) // 2))
    total = float(resources.get("CPU", 0))
    if cpus > max(working) or total < cpus + 1:
        # An actor that fits nowhere, or that leaves no CPU for decoding, would wait forever.
        raise FatalError(f"each inference actor asks for {cpus} CPU{'s' * (cpus != 1)} and the decoding for 1 more, "
                         f"but the cluster has {total:g} CPUs (the largest node {max(working):g}): lower "
                         "--ray-actor-cpus or add CPUs")
    actors = args.ray_actors or max(1, int(total // (2 * cpus)))
    return Pool(min(actors, max(1, int((total - 1) // cpus))), float(cpus), 0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def explain(exc: BaseException) -> str:
    """One sentence for a failure of the Ray job. Ray wraps what a task or actor raised (RayTaskError,
    UserCodeException) and keeps the original only as the text of its traceback: the first exception named
    there is the one that says what went wrong."""
    from service.core.errors import StartupError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, StartupError):
            return f"an inference actor could not load the model: {cause}"
        cause = getattr(cause, "cause", None) or cause.__cause__
    for line in str(exc).splitlines():
        match = _RAISED.match(line)
        if match and not match.group(1).startswith("ray.") and "UserCodeException" not in match.group(1):
            kind, message = match.group(1).rpartition(".")[2], match.group(2).strip()
            if kind == "StartupError":
                return f"an inference actor could not load the model: {message}"
            return f"the Ray job failed: {kind}: {message[:300]}"
    return f"the Ray job failed: {type(exc).__name__}: {_first_line(exc)[:300]}"


class RayRunner:
    """The runner of a ``--ray`` run: the whole list of paths in, a stream of results out (``results``),
    for ``service.cli.main.Run`` to write, count and show. ``read``: the command's file reader."""

    file_limit_name = "EFFNET_MAX_BODY_BYTES"

    def __init__(self, args: argparse.Namespace, task: str, *, top_k: int, normalize: bool,
                 read: Callable[..., list[tuple[str, bytes | Result]]]) -> None:
        self.args = args
        self.task = task
        self.top_k = top_k
        self.normalize = normalize
        self.read = read
        self.address: str = args.ray
        self.num_classes = 0
        self.dim = 0
        self.duplicates = 0  # rows the cluster delivered twice (a task redone after a node was lost)
        self._ray = None
        self._connected = False

    def default_concurrency(self) -> int:
        return 1  # the cluster sizes the work; nothing is in flight in this process

    def describe(self) -> str:
        return self._description

    # -- start: the model's facts, the cluster, the pool -----------------------------------------------------
    async def start(self) -> None:
        from pydantic import ValidationError

        from service.core.errors import StartupError
        from service.core.settings import settings_problems
        from service.ray_data import model_spec

        args = self.args
        try:
            self.spec, self.server = model_spec(args.model, args.weights)
        except ValidationError as exc:
            raise FatalError(f"invalid setting: {settings_problems(exc)}") from None
        except (ValueError, StartupError) as exc:
            raise FatalError(f"cannot load the model: {exc}") from None
        self.max_file_bytes = self.server.max_body_bytes
        # The actors read the checkpoint and labels in their own working folder: send absolute paths.
        files = {key: os.path.abspath(value) for key in ("weights", "labels", "int8_model", "calibration_dir")
                 if isinstance(value := getattr(self.spec.settings, key, None), str) and value.lower() != "random"}
        if files:
            self.spec = dataclasses.replace(self.spec, settings=self.spec.settings.model_copy(update=files))
        # The model's facts (classes, labels, embedding size, preprocessing), from a cheap load here while
        # Ray starts: the checkpoint on the CPU with the torch engine, whatever the actors will run. A model
        # that cannot load stops the run with the server's sentence.
        probe = self.spec.settings.model_copy(update={"backend": "torch", "device": "cpu", "dtype": "float32",
                                                      "num_threads": 1, "warmup": False})
        from service.core.loading import load_model

        loading = asyncio.ensure_future(asyncio.to_thread(load_model, dataclasses.replace(self.spec, settings=probe)))
        try:
            self._connect()  # blocks this thread (Ray wants its main thread) while the model loads in another
        finally:
            try:
                facts = await loading
            except StartupError as exc:
                raise FatalError(f"cannot load the model: {exc}") from None
        self.num_classes = facts.num_classes
        self.dim = facts.num_features
        self.preprocess = facts.preprocess
        self.model_name = facts.name
        del facts
        self._size()

    def _connect(self) -> None:
        # Never a Ray started behind the command's back (a Ray call after shutdown would start one).
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
        try:
            import ray
            import ray.data  # noqa: F401 - Ray Data's own dependencies (pandas, pyarrow) come with the extra
        except ImportError:
            raise FatalError("--ray needs Ray Data: pip install 'effnet-serve[ray]'") from None
        self._ray = ray
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address == LOCAL:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a private cluster
            options.update(address="local", include_dashboard=False)
        else:
            options["address"] = self.address
        try:
            with _quiet_core():
                ray.init(**options)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all end the run here
            where = ("start a local Ray cluster" if self.address == LOCAL
                     else f"connect to the Ray cluster at {self.address}")
            raise FatalError(f"cannot {where}: {_first_line(exc)}") from None
        self._connected = True
        # Ray Data's notes ("Starting execution ...", "Progress bars disabled") and its error lines would
        # break into the command's progress; its failures reach the command as exceptions (explain()).
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the command draws its own
        context.print_on_execution_start = False

    def _size(self) -> None:
        ray = self._ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
        resources = ray.cluster_resources()
        self.pool = pool = size_pool(self.args, resources, node_cpus, self.spec.settings.device,
                                     self.spec.settings.num_threads)
        where = "a local Ray cluster" if self.address == LOCAL else f"Ray at {self.address}"
        gpus = resources.get("GPU", 0)
        hardware = f"{len(nodes)} node{'s' * (len(nodes) != 1)}, {resources.get('CPU', 0):g} CPUs" + (
            f", {gpus:g} GPUs" if gpus else "")
        each = f"{pool.cpus:g} CPU" + ("s" if pool.cpus != 1 else "") + (f" + {pool.gpus:g} GPU" if pool.gpus else "")
        self._description = (f"{self.model_name} on {where} ({hardware}; up to {pool.actors} inference "
                             f"actor{'s' * (pool.actors != 1)} of {each})")

    # -- the job ----------------------------------------------------------------------------------------------
    def dataset(self, paths: list[str]):
        """The job as a Ray Data pipeline: paths -> read and decode (CPU tasks) -> infer (actor pool)."""
        ray = self._ray
        from ray.data import ActorPoolStrategy

        from service.ray_data import EfficientNetPredictor

        pool = self.pool
        blocks = max(1, math.ceil(len(paths) / ROWS_PER_TASK))
        ds = ray.data.from_items([{"path": p, "file": os.path.abspath(p)} for p in paths], override_num_blocks=blocks)
        # max_retries=-1 is Ray Data's default for tasks (a task lost with its node runs again); said here it
        # also keeps decoding out of the actors: Ray Data fuses a map into the next one when their remote
        # arguments are equal, which would decode inside the inference actors, one batch after the other.
        ds = ds.map_batches(read_and_decode, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                            num_cpus=1, max_retries=-1, fn_kwargs={"preprocess": self.preprocess,
                                                   "max_pixels": self.server.max_image_pixels,
                                                   "max_bytes": self.max_file_bytes, "read": self.read})
        return ds.map_batches(
            EfficientNetPredictor, batch_size=ACTOR_BATCH, batch_format="numpy", zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=1, max_size=pool.actors), num_cpus=pool.cpus,
            num_gpus=pool.gpus or None,
            fn_constructor_kwargs={"spec": self.spec, "task": self.task, "top_k": self.top_k,
                                   "normalize": self.normalize,
                                   "settings": {"max_image_pixels": self.server.max_image_pixels}},
        )

    async def results(self, pending: list[str], refuses: Callable[[str], str | None]) -> AsyncIterator[Result]:
        """Each pending path's result, in the order they finish; every path exactly once."""
        todo = []
        for path in pending:
            refused = refuses(path)
            if refused:
                yield failure(path, "unsupported_path", refused)
            else:
                todo.append(path)
        if not todo:
            return
        try:
            batches = await _in_daemon_thread(self._iterate, todo)
            wanted, seen = set(todo), set()
            while True:
                table = await _in_daemon_thread(_next_batch, batches)
                if table is None:
                    break
                for result in rows(table, self.task):
                    if result.path in seen or result.path not in wanted:
                        self.duplicates += 1
                        continue
                    seen.add(result.path)
                    yield result
        except FatalError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the cluster raised: one sentence, then resume
            raise FatalError(explain(exc)) from None
        missing = len(todo) - len(seen)
        if missing:
            raise FatalError(f"the Ray job ended without a result for {missing} image{'s' * (missing != 1)}")

    def _iterate(self, paths: list[str]):
        return iter(self.dataset(paths).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))

    async def close(self) -> None:
        if self._ray is not None and self._connected:
            # An interrupted run leaves a batch being fetched in its thread: the shutdown ends the fetch (with
            # an error nobody reads; auto-connect is off, so it cannot start another Ray).
            await asyncio.to_thread(self._ray.shutdown)


@contextlib.contextmanager
def _quiet_core() -> Iterator[None]:
    """Ray's C++ core logs to this process's stderr: a warning about actor arguments that Ray Data always
    triggers (ray#53727) and, to silence it, a note that the level was set. The level is set here unless
    the user chose one (RAY_BACKEND_LOG_LEVEL), and the note dropped: stderr is muted while Ray starts."""
    if "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """``fn(*args)`` in a thread of its own that never holds up the exit: Ray's waits cannot be cancelled,
    and an interrupted run must not wait for the batch it no longer wants."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(value)

    def work() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name="effnet-ray-fetch", daemon=True).start()
    return future


def _next_batch(batches) -> Any:
    return next(batches, None)


def rows(table: Any, task: str) -> list[Result]:
    """An actor's output table as the command's results (the row types of a local run)."""
    import numpy as np

    paths = table.column("path").to_pylist()
    errors = table.column("error").to_pylist()
    if task == "predict":
        values = table.column("top_k").to_pylist()
        return [Result(p, error=e) if e is not None else Result(p, top_k=v)
                for p, v, e in zip(paths, values, errors, strict=True)]
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    flat = column.values.to_numpy(zero_copy_only=False)[column.offset * dim:(column.offset + len(column)) * dim]
    matrix = np.asarray(flat, dtype=np.float64).reshape(len(column), dim)
    return [Result(p, error=e) if e is not None else Result(p, embedding=matrix[i].copy())
            for i, (p, e) in enumerate(zip(paths, errors, strict=True))]
