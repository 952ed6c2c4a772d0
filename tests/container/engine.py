"""A container engine for tests/container: docker where its daemon answers, otherwise podman.

What the tests need from it: build the Dockerfile's CPU target once, run containers the way the README
says, inspect them, and run the compose file. Everything a machine without a registry needs is here
too, and each such step is said in the session summary (``Engine.notes``):

- the Dockerfile's base image, when it is neither present nor pullable, is a stand-in made from
  Debian bookworm with mmdebstrap (python3 3.11, the same Debian release as python:3.11-slim-bookworm)
  and imported under the base's name, labelled ``org.effnet.test.stand-in``;
- podman: where crun cannot start containers (no setrlimit, cgroups v1 "hybrid"), runc with bounded
  ulimits (tests/container/containers.conf);
- the host's pip settings (CA bundle, find-links folders, local indexes) are mounted into the build
  stages only: podman leaves an empty mount point behind in every RUN of a build that mounts it, so the
  build with mounts stops at the ``build-cpu`` stage and the runtime stages are built in a second
  command without any mount, taking ``build-cpu`` from the layer cache. Both commands build one
  snapshot of the build context, so that a source file edited between them (minutes apart on a busy
  machine) cannot miss that cache and send the second command's pip to an index it cannot reach.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tests.helpers.components import missing_component

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# The tag the README's build command and docker-compose.yml use.
IMAGE = "effnet-serve:0.1.0-cpu"
STAND_IN_LABEL = "org.effnet.test.stand-in"
# Where the stand-in base's root filesystem tarball is kept between sessions on one machine.
CACHE = Path(os.environ.get("EFFNET_CONTAINER_CACHE", "/var/tmp/effnet-container"))
# python:3.11-slim-bookworm's content that the Dockerfile relies on: python with venv, CA certificates.
STAND_IN_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata"


def dockerfile_base() -> str:
    """The image every stage of the Dockerfile starts from (the first FROM)."""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            return line.split()[1]
    raise AssertionError("Dockerfile without FROM")


@dataclass
class Engine:
    """One container engine (``docker`` or ``podman``) with the environment its commands need."""

    name: str
    env: dict[str, str]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``<engine> args...``; stdout and stderr captured as text; CalledProcessError (with both) if
        ``check`` and it fails."""
        proc = subprocess.run(
            [self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.name} {shlex.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, timeout=60).returncode == 0

    def inspect(self, ref: str, kind: str = "image") -> dict:
        return json.loads(self.run(kind, "inspect", ref).stdout)[0]

    def labels(self, ref: str) -> dict[str, str]:
        config = self.inspect(ref).get("Config") or {}
        return config.get("Labels") or {}

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def find_engine() -> Engine:
    """docker when its daemon answers, otherwise podman; skipped (failed under CI) when neither works.

    ``EFFNET_CONTAINER_ENGINE=docker|podman`` picks one.
    """
    wanted = os.environ.get("EFFNET_CONTAINER_ENGINE")
    tried = []
    for name in [wanted] if wanted else ["docker", "podman"]:
        if shutil.which(name) is None:
            tried.append(f"{name}: not installed")
            continue
        env = dict(os.environ)
        if name == "podman" and "CONTAINERS_CONF" not in env and shutil.which("runc"):
            env["CONTAINERS_CONF"] = str(HERE / "containers.conf")
        try:
            proc = subprocess.run([name, "info"], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            tried.append(f"{name}: `{name} info` hung")
            continue
        if proc.returncode == 0:
            engine = Engine(name, env)
            if "CONTAINERS_CONF" in env and env["CONTAINERS_CONF"] == str(HERE / "containers.conf"):
                engine.note("podman with runc and bounded ulimits (tests/container/containers.conf)")
            return engine
        tried.append(f"{name}: {(proc.stderr.strip().splitlines() or ['no answer'])[-1]}")
    missing_component("no working container engine (" + "; ".join(tried) + ")")
    raise AssertionError("unreachable")


def ensure_base(engine: Engine, ref: str) -> bool:
    """Make ``ref`` available: present, pulled, or (only when it cannot be pulled) a Debian stand-in.

    Returns True when it is a stand-in; says which in the notes.
    """
    if not engine.image_exists(ref):
        started = time.monotonic()
        pulled = engine.run("pull", ref, check=False, timeout=600)
        if pulled.returncode == 0:
            engine.note(f"base image {ref}: pulled in {time.monotonic() - started:.0f} s")
        else:
            reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
            engine.note(f"base image {ref}: cannot be pulled ({reason[:160]})")
            make_stand_in(engine, ref)
    if STAND_IN_LABEL in engine.labels(ref):
        engine.note(
            f"base image {ref}: STAND-IN, Debian bookworm + python3 made with mmdebstrap "
            f"({engine.labels(ref)[STAND_IN_LABEL]}), not the official image"
        )
        return True
    return False


def make_stand_in(engine: Engine, ref: str) -> None:
    """A Debian bookworm root filesystem with python3 (mmdebstrap), imported as ``ref``."""
    if shutil.which("mmdebstrap") is None:
        missing_component(f"{ref} cannot be pulled and mmdebstrap (to make a stand-in) is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "bookworm-python3.tar"
    started = time.monotonic()
    if not tarball.exists():
        partial = tarball.with_suffix(".partial.tar")
        proc = subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={STAND_IN_PACKAGES}", "bookworm", str(partial)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, f"mmdebstrap failed:\n{proc.stderr[-4000:]}"
        partial.rename(tarball)
    # podman resolves the short name in FROM to localhost/<name> with --pull=never; docker to docker.io.
    target = f"localhost/{ref}" if engine.name == "podman" and "/" not in ref else ref
    description = f"mmdebstrap --variant=minbase --include={STAND_IN_PACKAGES} bookworm"
    engine.run(
        "import",
        "--change", f'LABEL {STAND_IN_LABEL}="{description}"',
        "--change", 'CMD ["python3"]',
        str(tarball),
        target,
        timeout=600,
    )  # fmt: skip
    engine.timings["stand-in base image"] = time.monotonic() - started


@dataclass
class PipSettings:
    """The host's pip configuration, rewritten for a build container, and the paths it needs mounted."""

    conf: str
    mounts: list[str]
    local_index: str | None


def host_pip_settings() -> PipSettings | None:
    """What the host's pip uses beyond PyPI (CA bundle, find-links, extra indexes), or None if nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    )
    values: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"^(:env:)?[\w-]*\.([\w-]+)='(.*)'$", line.strip())
        if match:  # the environment (PIP_*) wins over the files, as in pip itself
            key = match.group(2).replace("_", "-")
            if match.group(1) or key not in values:
                values[key] = match.group(3)
    wanted = {"cert", "find-links", "index-url", "extra-index-url", "trusted-host"}
    keep = {k: v for k, v in values.items() if k in wanted}
    if not keep:
        return None
    mounts: set[str] = set()
    local_index = None
    for key, value in keep.items():
        for item in value.split():
            if key == "cert" and os.path.isfile(item):
                mounts.add(item)
            elif key == "find-links" and os.path.isdir(item):
                mounts.add(item)
            elif key in ("index-url", "extra-index-url") and item.startswith("file://"):
                path = Path(urlparse(item).path)
                # A file index ("<root>/simple") links its files relative to <root>.
                mounts.add(str(path.parent if path.name == "simple" else path))
                local_index = local_index or item
    lines = ["[global]", *(f"{k} = {v}" for k, v in keep.items())]
    return PipSettings(conf="\n".join(lines) + "\n", mounts=sorted(mounts), local_index=local_index)


def snapshot_context(into: Path) -> Path:
    """A copy of the build context as the daemon would receive it: the Dockerfile, .dockerignore and the
    paths its allow-list admits (``!name`` lines), without what it excludes again (caches, ONNX files)."""
    names = [line[1:].strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.startswith("!")]
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.pyd", "*.onnx")
    for name in ["Dockerfile", ".dockerignore", *names]:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=skip)
        elif source.exists():
            shutil.copy2(source, into / name)
    return into


def build_cpu_image(engine: Engine, tag: str = IMAGE) -> None:
    """Build the Dockerfile's ``cpu`` target as ``tag`` (see the module's docstring for the two steps)."""
    with tempfile.TemporaryDirectory(prefix="effnet-build-context-") as context:
        _build_cpu_image(engine, tag, snapshot_context(Path(context)))


def _build_cpu_image(engine: Engine, tag: str, context: Path) -> None:
    base = dockerfile_base()
    stand_in = ensure_base(engine, base)
    args = ["build", "--target", "cpu", "-t", tag]
    if engine.name == "podman":
        # The OCI format has no HEALTHCHECK; the docker format keeps it.
        args += ["--format", "docker"]
    if stand_in:
        args += ["--pull=never"]
    torch_index = os.environ.get("EFFNET_TEST_TORCH_INDEX_URL")
    pip = host_pip_settings() if engine.name == "podman" else None
    if torch_index is None and pip is not None and pip.local_index:
        torch_index = pip.local_index
    if torch_index:
        args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
        engine.note(f"TORCH_INDEX_URL={torch_index} (the PyTorch CPU index is the Dockerfile's default)")
    started = time.monotonic()
    if pip is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = CACHE / "pip.conf"
        conf.write_text(pip.conf)
        volumes = [f"{conf}:/etc/pip.conf:ro", *(f"{p}:{p}:ro" for p in pip.mounts)]
        engine.note("pip settings of the host mounted into the build stages only: " + ", ".join(pip.mounts))
        first = [a if a != "cpu" else "build-cpu" for a in args]
        first[first.index("-t") + 1] = f"{tag.split(':')[0]}:build-cpu"
        for volume in volumes:
            first += ["-v", volume]
        engine.run(*first, str(context), timeout=3000)
    engine.run(*args, str(context), timeout=3000)
    engine.timings["image build"] = time.monotonic() - started


def container_logs(engine: Engine, name: str) -> str:
    proc = engine.run("logs", name, check=False, timeout=60)
    return (proc.stdout + proc.stderr)[-6000:]


# Run inside a container with the image's python: every process it sees, as JSON.
_PROCESSES_SCRIPT = """
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except OSError:
        continue
    rest = stat.rsplit(")", 1)[1].split()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    out.append({"pid": int(pid), "ppid": int(rest[1]), "state": rest[0], "comm": comm,
                "uid": status["Uid"].split()[0], "cap_eff": status["CapEff"].strip(),
                "no_new_privs": status.get("NoNewPrivs", "").strip(), "cmdline": cmdline})
print(json.dumps(out))
"""


def container_processes(engine: Engine, name: str) -> list[dict]:
    """The processes running in container ``name`` (pid, ppid, state, comm, uid, cap_eff, no_new_privs,
    cmdline), read from its /proc by the image's python; the reading process itself left out."""
    found = json.loads(engine.run("exec", name, "python", "-c", _PROCESSES_SCRIPT, timeout=60).stdout)
    return [p for p in found if p["pid"] == 1 or p["ppid"] != 0]


def server_processes(processes: list[dict]) -> dict[str, list[dict]]:
    """The server's processes by role: PID 1 ("supervisor", the server itself), "engine" (effnet-engine),
    "workers" (effnet-worker-N, by N), "tracker" (multiprocessing's resource tracker, which ``spawn``
    starts beside them) and "other" (anything else PID 1 started, or anything not under PID 1)."""
    roles: dict[str, list[dict]] = {"supervisor": [], "engine": [], "workers": [], "tracker": [], "other": []}
    for process in processes:
        if process["pid"] == 1:
            roles["supervisor"].append(process)
        elif process["ppid"] != 1:
            roles["other"].append(process)
        elif process["comm"] == "effnet-engine":
            roles["engine"].append(process)
        elif re.fullmatch(r"effnet-worker-\d+", process["comm"]):
            roles["workers"].append(process)
        elif "multiprocessing.resource_tracker" in process["cmdline"]:
            roles["tracker"].append(process)
        else:
            roles["other"].append(process)
    roles["workers"].sort(key=lambda p: int(p["comm"].rsplit("-", 1)[1]))
    return roles


# The README's `docker run` flags ("Deployment"): read-only root with a tmpfs /tmp, no capabilities, no
# privilege escalation. The tests publish the ports on loopback only, on free ports.
README_RUN_FLAGS = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


@dataclass
class Container:
    """A detached container of the image, HTTP and gRPC published on free loopback ports."""

    engine: Engine
    name: str
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def state(self) -> dict:
        return self.engine.inspect(self.name, "container")["State"]

    def logs(self) -> str:
        return container_logs(self.engine, self.name)

    def exec(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.engine.run("exec", self.name, *cmd, check=check, timeout=60)

    def wait_ready(self, timeout: float = 240.0) -> float:
        """Seconds until /readyz answered 200; AssertionError with the log if it exits or times out."""
        import httpx

        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() - started < timeout:
                try:
                    if client.get("/readyz").status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass
                if not self.state().get("Running", False):
                    raise AssertionError(f"container {self.name} exited:\n{self.logs()}")
                time.sleep(0.1)
        raise AssertionError(f"container {self.name} not ready after {timeout} s:\n{self.logs()}")

    def remove(self) -> None:
        now = ["-t", "0"] if self.engine.name == "podman" else []  # docker rm -f kills at once anyway
        self.engine.run("rm", "-f", *now, self.name, check=False, timeout=120)


def service_image(engine: Engine, wanted: str, local: str) -> str:
    """``wanted`` (docker-compose.yml's image) if present or pullable; otherwise Debian's package in a
    local image built from tests/container/images/<local>/ on the Dockerfile's base (said in the notes)."""
    if engine.image_exists(wanted) or engine.run("pull", wanted, check=False, timeout=600).returncode == 0:
        return wanted
    base = dockerfile_base()
    stand_in = ensure_base(engine, base)
    tag = f"localhost/effnet-test-{local}:debian-bookworm"
    started = time.monotonic()
    args = ["build", "-t", tag, "--build-arg", f"BASE={base}"]
    if engine.name == "podman":
        args += ["--format", "docker"]
    if stand_in:
        args += ["--pull=never"]
    engine.run(*args, str(HERE / "images" / local), timeout=1200)
    engine.timings[f"{local} image build"] = time.monotonic() - started
    engine.note(f"{wanted} cannot be pulled: Debian bookworm's {local} package in {tag} instead")
    return tag


def compose_command(engine: Engine) -> list[str]:
    """`docker compose` with docker; podman-compose with podman. Skipped (failed under CI) without it."""
    if engine.name == "docker":
        if engine.run("compose", "version", check=False, timeout=60).returncode == 0:
            return ["docker", "compose"]
        missing_component("docker has no compose plugin")
    found = shutil.which("podman-compose")
    if found is None:
        missing_component("podman-compose is not installed (.ci/run installs the pinned version)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60, env=engine.env)
    engine.note("compose: " + " / ".join(version.stdout.split("\n")[:1]))
    return [found]


def compose_project_label(engine: Engine) -> str:
    """The label each engine's compose puts on a project's containers, networks and volumes."""
    return "io.podman.compose.project" if engine.name == "podman" else "com.docker.compose.project"
