"""``efficientnet-batch``: the command line, and the run that connects PATHs, a runner and an output.

Exit status: 0 when every image succeeded (or there was nothing left to do), 1 when any image failed or
the run could not go on (model not loadable, server gone), 2 for a usage error, 130 / 143 when stopped
by SIGINT (Ctrl-C) / SIGTERM. An interrupted run leaves a valid output that ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from service.cli.discover import discover
from service.cli.on_ray import add_arguments as add_ray_arguments
from service.cli.on_ray import check_arguments as ray_usage
from service.cli.progress import PROG, Reporter, format_duration, make_reporter
from service.cli.results import FatalError, Result, failure
from service.cli.sinks import OutputError, Sink, open_sink, output_format

if TYPE_CHECKING:  # the settings import pydantic: loaded only for in-process runs
    from service.core.settings import ServerSettings

EXAMPLES = """\
examples:
  efficientnet-batch predict photos/ --output results.jsonl --top-k 3
  efficientnet-batch features photos/ extra.jpg --output embeddings.npy --normalize
  efficientnet-batch predict photos/ --output results.parquet --server http://10.0.0.5:8000 --concurrency 16
  efficientnet-batch predict photos/ --output birds.jsonl --server http://10.0.0.5:8000 --model birds
  efficientnet-batch predict photos/ --output results.jsonl --resume     # after an interruption

In-process runs read the server's settings from the environment (EFFNET_MODEL, EFFNET_WEIGHTS,
EFFNET_BACKEND, EFFNET_DTYPE, EFFNET_NUM_THREADS, EFFNET_DECODE_THREADS, EFFNET_MAX_BATCH_SIZE, ...).
With EFFNET_MODEL_REPOSITORY set they load one of the repository's models (--model NAME, else
EFFNET_DEFAULT_MODEL or its only model) from its model.toml, as the server would.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files and folders (walked recursively; images recognised by content)")
    common.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="results file: .jsonl, .parquet (needs pyarrow) or, for features, .npy; '-' for "
                             "JSON lines on stdout")
    existing = common.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue an existing output: skip the paths already in it, retry its errors")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing output")
    where = common.add_argument_group("where the model runs")
    where.add_argument("--server", metavar="URL",
                       help="send the images to a running service (or a load balancer) instead of loading the "
                            "model in this process")
    where.add_argument("--api-key", metavar="KEY", default=os.environ.get("EFFNET_API_KEY") or None,
                       help="the server's API key (default: $EFFNET_API_KEY)")
    where.add_argument("--concurrency", type=_positive_int, metavar="N",
                       help="images in flight at once; with --server, requests (default 8); in-process, "
                            "images being decoded or queued (default from the batch size and decode threads)")
    where.add_argument("--retries", type=_non_negative_int, default=10, metavar="N",
                       help="with --server: how often one request is retried after a 503/502/504/429 or a "
                            "connection failure, with backoff, before the run stops (default 10)")
    where.add_argument("--model", metavar="NAME",
                       help="with --server: the served model to use, by name (sent as ?model=NAME; default: the "
                            "server's default model); in-process with $EFFNET_MODEL_REPOSITORY: the repository's "
                            "model of that name (default: $EFFNET_DEFAULT_MODEL or its only model); in-process "
                            "otherwise: the variant (default: $EFFNET_MODEL or lite0)")
    where.add_argument("--weights", metavar="FILE",
                       help="in-process, without a model repository: a checkpoint (default: $EFFNET_WEIGHTS)")
    add_ray_arguments(where)
    shown = common.add_argument_group("progress")
    shown.add_argument("-q", "--quiet", action="store_true",
                       help="no progress and no summary; per-image errors are still printed")
    shown.add_argument("--progress-every", type=float, metavar="SECONDS",
                       help="print a plain progress line every SECONDS instead of a bar (the default when "
                            "stderr is not a terminal, every 10 s)")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Classify or embed every image under the given paths, in-process or with a running service.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="task", required=True, metavar="{predict,features}")
    predict = commands.add_parser("predict", parents=[common], help="top-k classes of each image (as /predict)",
                                  description="Top-k classes of each image, as POST /predict gives them.")
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                         help="classes per image (default 5)")
    predict.add_argument("--cam", metavar="DIR",
                         help="also explain each image's top-1 class: its class activation map drawn over the photo "
                              "as DIR/<path>.png and kept as DIR/<path>.npy (h x w float32 in [0, 1])")
    features = commands.add_parser("features", parents=[common], help="pooled embedding of each image "
                                   "(as /features)", description="The pooled embedding of each image, as POST "
                                   "/features gives it.")
    features.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


class Usage(Exception):
    """A mistake on the command line, found after parsing (exit 2)."""


# ---- the run ------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace, reporter: Reporter) -> None:
        self.args = args
        self.reporter = reporter
        self.task: str = args.task
        self.runner = None
        self.sink: Sink | None = None
        self.ok = 0
        self.failed = 0
        self.signal: int | None = None
        self.fatal: str | None = None
        self.elapsed = 0.0
        self.skipped = 0  # paths already done in a resumed output

    def make_runner(self):
        args = self.args
        top_k = getattr(args, "top_k", 5)
        normalize = getattr(args, "normalize", False)
        if problem := ray_usage(args):
            raise Usage(problem)
        cam = getattr(args, "cam", None)
        if cam and args.ray is not None:
            raise Usage("--cam runs in-process or with --server, not on Ray")
        if args.ray is not None:  # the whole job on a Ray cluster (service/cli/on_ray.py)
            from service.cli.on_ray import RayRunner

            return RayRunner(args, self.task, top_k=top_k, normalize=normalize, read=_read_chunk)
        if args.server:
            if args.weights:
                raise Usage("--weights applies in-process; the server serves its own checkpoints")
            from service.cli.remote import RemoteRunner

            return RemoteRunner(args.server, self.task, top_k=top_k, normalize=normalize, api_key=args.api_key,
                                concurrency=args.concurrency or 8, retries=args.retries, model=args.model, cam=cam)
        from pydantic import ValidationError

        from service.cli.local import IMAGE_DEADLINE_S, LocalRunner
        from service.core.settings import ModelSettings, ServerSettings, settings_problems

        server_overrides: dict[str, object] = {}
        if "EFFNET_REQUEST_TIMEOUT_S" not in os.environ:
            # No per-image deadline in a batch job (the queue is never overfilled); this bounds a hung engine.
            server_overrides["request_timeout_s"] = IMAGE_DEADLINE_S
        model_overrides: dict[str, object] = {"warmup": False}  # a batch job warms up on its first images
        name = None
        try:
            server = ServerSettings(**server_overrides)
            if server.model_repository:
                if args.weights:
                    raise Usage("--weights describes a single model; with EFFNET_MODEL_REPOSITORY each model's "
                                "model.toml names its checkpoint")
                name = repository_model(server, args.model)
            else:
                if args.model:
                    model_overrides["model"] = args.model
                if args.weights:
                    model_overrides["weights"] = args.weights
            base = ModelSettings(**model_overrides)
        except ValidationError as exc:
            raise Usage(f"invalid setting: {settings_problems(exc)}") from None
        runner = LocalRunner(server, base, self.task, top_k=top_k, normalize=normalize, name=name, cam=cam)
        if args.concurrency and args.concurrency > runner.served.settings.max_queue:
            raise Usage(f"--concurrency {args.concurrency} is above EFFNET_MAX_QUEUE "
                        f"({runner.served.settings.max_queue})")
        return runner

    async def main(self, images: list[str]) -> None:
        from service.core.errors import ConfigurationError, InvalidParameter, NoClassifier, StartupError
        from service.core.outputs import check_top_k

        args = self.args
        try:
            self.runner = runner = self.make_runner()
        except ConfigurationError as exc:
            raise Usage(str(exc)) from None
        except StartupError as exc:
            raise FatalError(f"cannot load the model: {exc}") from None
        try:
            await runner.start()
            if self.task == "predict":
                try:
                    check_top_k(runner, args.top_k, parameter="--top-k")  # the check every door makes
                except NoClassifier:
                    raise Usage("the model's checkpoint has no classifier: use 'efficientnet-batch features'") from None
                except InvalidParameter as exc:
                    raise Usage(exc.message) from None
            self.sink = sink = open_sink(args.output, self.task, dim=runner.dim, resume=args.resume,
                                         overwrite=args.overwrite)
            try:
                self.skipped = sum(1 for p in images if p in sink.done)
                pending = [p for p in images if p not in sink.done]
                what = "predict" if self.task == "predict" else "features"
                self.reporter.start(len(pending), f"{what} with {runner.describe()} -> {sink.label}")
                await self._process(pending, args.concurrency or runner.default_concurrency())
            finally:
                sink.close()
        finally:
            await runner.close()

    async def _process(self, pending: list[str], concurrency: int) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if self.signal is not None:  # a second signal: leave now (rows written so far stay)
                os._exit(128 + signum)
            self.signal = signum
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        queue: asyncio.Queue[tuple[str, bytes | Result] | None] = asyncio.Queue(maxsize=2 * concurrency)
        workers = min(concurrency, len(pending))
        started = time.monotonic()
        if hasattr(self.runner, "results"):  # a runner that takes the whole list and streams results (--ray)
            tasks = [asyncio.ensure_future(self._stream(pending))]
        else:
            tasks = [asyncio.ensure_future(self._read_ahead(pending, queue, workers)),
                     *(asyncio.ensure_future(self._worker(queue)) for _ in range(workers))]
        everything = asyncio.gather(*tasks)
        stopper = asyncio.ensure_future(stop.wait())
        ticker = asyncio.ensure_future(self._tick())
        try:
            await asyncio.wait({everything, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():  # interrupted: in-flight images are dropped (a resume redoes them)
                everything.cancel()
            try:
                await everything
            except asyncio.CancelledError:
                pass
        except FatalError as exc:
            self.fatal = str(exc)
        finally:
            for task in (*tasks, stopper, ticker):
                task.cancel()
            await asyncio.gather(*tasks, stopper, ticker, return_exceptions=True)
            self.elapsed = time.monotonic() - started
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.reporter.tick()

    async def _read_ahead(self, pending: list[str], queue: asyncio.Queue, workers: int) -> None:
        """Read the files in a thread, a few at a time and ahead of the workers (one thread hop per chunk,
        not per image: on a small machine the hop costs as much as reading a cached photo)."""
        limit = self.runner.max_file_bytes
        where = self.runner.file_limit_name
        for first in range(0, len(pending), READ_CHUNK):
            chunk = pending[first:first + READ_CHUNK]
            for path, data in await asyncio.to_thread(_read_chunk, chunk, limit, self.sink.refuses, where):
                await queue.put((path, data))
        for _ in range(workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            path, data = item
            result = data if isinstance(data, Result) else await self.runner.run(path, data)
            self._record(result)

    async def _stream(self, pending: list[str]) -> None:
        async for result in self.runner.results(pending, self.sink.refuses):
            self._record(result)

    def _record(self, result: Result) -> None:
        self.sink.write(result)
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.reporter.error(result.path, result.error["message"])
        self.reporter.advance(result.ok)

    # ---- the end --------------------------------------------------------------------------------------------
    def summary(self, ignored: int, unreadable_dirs: int) -> str:
        done = self.ok + self.failed
        rate = done / self.elapsed if self.elapsed > 0 else 0.0
        errors = _count(self.failed, "error")
        head = _count(done, "image")
        if self.signal is not None:
            head = f"interrupted by {signal.Signals(self.signal).name} after {head}"
        took = f"{self.elapsed:.1f} s" if self.elapsed < 60 else format_duration(self.elapsed)
        parts = [f"{PROG}: {head} in {took} ({rate:.1f} images/s): {self.ok} ok, {errors}"]
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        if self.sink is not None and self.sink.retried:
            parts.append(_count(self.sink.retried, "earlier error") + " tried again")
        retried = getattr(self.runner, "retried", 0)
        if retried:
            parts.append(_count(retried, "request") + " retried")
        if ignored:
            parts.append(_count(ignored, "non-image file") + " ignored")
        if unreadable_dirs:
            parts.append(_count(unreadable_dirs, "folder") + " unreadable")
        line = "; ".join(parts)
        if self.sink is not None:
            line += f" -> {self.sink.label}"
        if self.signal is not None or self.fatal:
            line += " (run again with --resume to finish)"
        return line


def repository_model(server: ServerSettings, wanted: str | None) -> str:
    """The name of the repository model an in-process run loads: ``wanted`` (--model), else the one a
    server of these settings gives a request that names none (``default_model_name``, the registry's
    rule). ``StartupError`` for a repository the server would refuse too."""
    from service.core.registry import default_model_name
    from service.core.repository import ModelRepository
    from service.core.settings import ModelSettings

    assert server.model_repository
    repository = ModelRepository(server.model_repository, ModelSettings())
    source = "--model"
    if not wanted:
        names = repository.startup_names(server.models)
        wanted, source = default_model_name(server, names), "EFFNET_DEFAULT_MODEL"
        if wanted is None:
            raise Usage(f"the model repository {repository.root} holds several models ({', '.join(names)}): "
                        "name one with --model NAME")
    if wanted not in repository:
        # With a repository --model names one of its models, never a variant.
        raise Usage(f"{source} {wanted}: no such model in the repository {repository.root} (it has: "
                    f"{', '.join(repository.names()) or 'nothing'})")
    return wanted


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


READ_CHUNK = 16  # files read per trip to the reading thread


def _read_chunk(paths: list[str], limit: int | None, refuses, where: str) -> list[tuple[str, bytes | Result]]:
    """Each path's bytes, or the error row that stands in for them."""
    out: list[tuple[str, bytes | Result]] = []
    for path in paths:
        refused = refuses(path)
        if refused:
            out.append((path, failure(path, "unsupported_path", refused)))
            continue
        try:
            with open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
                if limit is not None and len(data) > limit:
                    size = max(os.fstat(f.fileno()).st_size, len(data))
                    out.append((path, failure(path, "body_too_large",
                                              f"file is {size} bytes; the limit is {limit} ({where})")))
                    continue
        except OSError as exc:
            out.append((path, failure(path, "unreadable", f"cannot read file: {exc.strerror or exc}")))
            continue
        out.append((path, data))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{PROG}: %(message)s")
    try:
        output_format(args.output, args.task)
    except OutputError as exc:
        parser.error(str(exc))
    if args.resume and args.output == "-":
        parser.error("--resume needs an output file, not stdout")

    found = discover(args.paths)
    if found.missing:
        parser.error("no such file or folder: " + ", ".join(found.missing))
    for folder, reason in found.unreadable_dirs:
        print(f"error: {folder}: cannot list folder: {reason}", file=sys.stderr)
    reporter = make_reporter(quiet=args.quiet, every=args.progress_every)
    run = Run(args, reporter)
    try:
        asyncio.run(run.main(found.images))
    except Usage as exc:
        reporter.finish()
        parser.error(str(exc))
    except OutputError as exc:
        reporter.finish()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except FatalError as exc:
        run.fatal = str(exc)
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        reporter.finish()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    reporter.finish()
    if run.fatal:
        print(f"{PROG}: error: {run.fatal}", file=sys.stderr)
    if run.sink is not None or not run.fatal:
        reporter.say(run.summary(found.ignored, len(found.unreadable_dirs)))
    if run.signal is not None:
        return 128 + run.signal
    if run.fatal or run.failed or found.unreadable_dirs:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
