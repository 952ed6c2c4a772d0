"""The project's layering holds: no import cycle between its modules (imports inside functions included),
the model package never imports the service, the service's core imports no front-end and names no route
or front-end, no front-end imports another, and only the server assembly stands above the front-ends."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "service")


def _parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse``, asked again when CPython 3.11 raises its spurious "AST constructor recursion depth
    mismatch" SystemError (python/cpython#106905, fixed in 3.12: the depth it checks can be moved by
    another thread while the tree is built; seen once in a full run here). Any other error stands."""
    try:
        return ast.parse(source, filename=filename)
    except SystemError as exc:
        if "recursion depth mismatch" not in str(exc):
            raise
        return ast.parse(source, filename=filename)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (resolved to the deepest module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # "from package import submodule" imports the submodule; "from module import name" the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    graph = _graph()
    assert "model.config" in graph["model.efficientnet"]  # a relative import
    assert "service.core.registry" in graph["service.server.app"]
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "a.py"
    source.write_text("def f():\n    from .b import thing\n    import pkg.c\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert _imports(source, {"pkg.a", "pkg.b", "pkg.c"}) == {"pkg.b", "pkg.c"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    assert _find_cycle(_graph()) is None


def test_model_never_imports_service():
    offenders = {m: sorted(d) for m, d in _graph().items()
                 if m.startswith("model") and any(t.startswith("service") for t in d)}
    assert offenders == {}


def test_core_imports_no_front_end():
    offenders = {m: sorted(t for t in d if not t.startswith(("service.core", "model")))
                 for m, d in _graph().items() if m.startswith("service.core")}
    assert {m: d for m, d in offenders.items() if d} == {}


# The doors (front-ends), side by side; ``service.asgi`` lies below both HTTP doors, ``service.server`` above all.
DOORS = ("service.http", "service.v2", "service.web", "service.cli")


def _door(module: str) -> str | None:
    return next((d for d in DOORS if module == d or module.startswith(d + ".")), None)


def test_no_door_imports_another():
    offenders = {m: sorted(t for t in d if _door(t) not in (None, _door(m)))
                 for m, d in _graph().items() if _door(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_only_the_server_assembly_imports_the_server_package():
    offenders = sorted(m for m, d in _graph().items()
                       if any(t.startswith("service.server") for t in d)
                       and not m.startswith("service.server") and m != "service.__main__")
    assert offenders == []


def _strings(tree: ast.Module) -> list[str]:
    """The string constants of a module, its docstrings left out (they may name anything)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


# The names the doors go by (the access log's "method" of a gRPC call or a batch-command image). The core
# may say "grpc" as the OTLP exporter's protocol: that names no door.
FRONT_END_NAMES = {"gRPC", "CLI", "HTTP", "REST", "V2", "web"}


def _route_prefixes() -> set[str]:
    """The static beginning of every route the app serves ("/v2/models/" for "/v2/models/{model_name}"),
    and the gRPC services' names."""
    from service.server.app import create_app
    from service.server.routes import served_routes
    from service.v2.grpc_server import HEALTH_SERVICE, SERVICE_NAME

    paths = {route.path for route in served_routes(create_app().routes)}
    prefixes = {path.split("{", 1)[0] for path in paths if len(path) > 1}
    return prefixes | {SERVICE_NAME, HEALTH_SERVICE}


def _route_strings(prefix: str) -> dict[str, list[str]]:
    routes = _route_prefixes()
    found = {m: sorted({s for s in _strings(tree) if any(s.startswith(r) for r in routes)
                        or s.strip() in FRONT_END_NAMES})
             for m, tree in _sources(prefix).items()}
    return {m: s for m, s in found.items() if s}


def test_the_core_names_no_route_and_no_front_end():
    """Route labels come from the door that owns the route, the access record's transport fields from its
    caller: the core never compares a path or a protocol's name."""
    assert _route_strings("service.core") == {}


def test_the_route_check_sees_a_planted_route(tmp_path, monkeypatch):
    (tmp_path / "service" / "core").mkdir(parents=True)
    (tmp_path / "service" / "core" / "rogue.py").write_text(
        '"""Docstrings may say /predict."""\n\ndef label(path, method):\n'
        '    if method == "gRPC":\n        return "x"\n    return "/v2/models/x" if path else "/predict"\n'
    )
    routes = _route_prefixes()  # from the real app, before ROOT moves
    monkeypatch.setattr(__import__(__name__, fromlist=["_route_prefixes"]), "_route_prefixes", lambda: routes)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert _route_strings("service.core") == {"service.core.rogue": ["/predict", "/v2/models/x", "gRPC"]}


# -- one request path -----------------------------------------------------------------------------------------
FRONT_ENDS = ("service.http", "service.v2", "service.cli", "service.web")


def _sources(prefix: str = "service") -> dict[str, ast.Module]:
    files = [p for p in (ROOT / "service").rglob("*.py") if "/pb/" not in p.as_posix()]
    return {m: tree for p in files
            if (m := _module_name(p)).startswith(prefix) and (tree := _parse(p.read_text(), filename=str(p)))}



def _calls(tree: ast.Module) -> list[str]:
    return [node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]


def test_front_ends_reach_the_model_only_through_the_core_entry():
    """Admission, the image cap, the deadline and cancellation are the core's (``InferenceService.serve``):
    a front-end that called ``admit`` or ``infer`` itself would be a second copy of that path."""
    offenders = {m: sorted({c for c in _calls(tree) if c in ("admit", "infer", "infer_arrays")})
                 for m, tree in _sources().items() if m.startswith(FRONT_ENDS)}
    assert {m: c for m, c in offenders.items() if c} == {}
    callers = sorted(m for m, tree in _sources().items() if m.startswith(FRONT_ENDS) and "serve" in _calls(tree))
    # HTTP /predict and /features, V2 REST, gRPC and the batch command each call it.
    assert callers == ["service.cli.local", "service.http.inference", "service.v2.grpc_server", "service.v2.rest"]


def _defined(name: str) -> list[str]:
    return sorted(m for m, tree in _sources().items() for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name)


def test_request_rules_are_defined_once():
    """The disconnect watch, the request-id rule and the access-log line each live in one place."""
    assert _defined("wait_for_disconnect") == ["service.asgi"]
    assert _defined("_wait_for_disconnect") == []
    patterns = sorted(m for m, tree in _sources().items() for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str) and "{1,128}" in node.value)
    assert patterns == ["service.core.access"]
    access_loggers = sorted(m for m, tree in _sources().items() for node in ast.walk(tree)
                            if isinstance(node, ast.Constant) and node.value == "service.access")
    assert access_loggers == ["service.core.access"]
    assert _defined("AccessRecord") == ["service.core.access"]


def test_the_rule_checks_see_a_planted_copy(tmp_path, monkeypatch):
    """The checks above would notice a front-end that admitted work itself or kept its own watcher."""
    (tmp_path / "service" / "http").mkdir(parents=True)
    (tmp_path / "service" / "http" / "rogue.py").write_text(
        "async def _wait_for_disconnect(receive):\n    pass\n\n"
        "async def handler(service):\n    with service.admit():\n        return await service.infer([])\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert _defined("_wait_for_disconnect") == ["service.http.rogue"]
    assert sorted(set(_calls(_sources()["service.http.rogue"]))) == ["admit", "infer"]


# The only probes the core may make: of a third-party library's version-dependent API.
ALLOWED_PROBES = {("service/core/engines/torch_engine.py", "hasattr(torch.backends.cudnn, 'conv')"),
                  ("service/core/trace_export.py", "getattr(self, '_client', None)")}  # the OTel SDK's exporter


def _probes(root: Path) -> set[tuple[str, str]]:
    found = set()
    for path in sorted((root / "service" / "core").rglob("*.py")):
        for node in ast.walk(_parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr")):
                found.add((path.relative_to(root).as_posix(), ast.unparse(node)))
    return found


def test_the_core_uses_its_contracts_without_probing():
    """The engine contract is one base class (``service.core.engines.base.Engine``) with every method the
    core calls, each with a default where one makes sense; every engine derives from it; and the core
    probes no object of its own with ``getattr``/``hasattr`` (an optional attribute would be a silent
    default when its name drifts): only a third-party library's version-dependent API, listed above."""
    from service.core.engines.base import Engine

    assert {"run", "input_buffers", "warm_up_thread", "warm_up"} <= set(dir(Engine))
    assert Engine.__abstractmethods__ == frozenset({"run"})
    assert _probes(ROOT) - ALLOWED_PROBES == set()
    engine_classes = []
    for path in sorted((ROOT / "service" / "core" / "engines").glob("*.py")):
        for node in ast.walk(_parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Engine") and node.name != "Engine":
                engine_classes.append((node.name, [ast.unparse(b) for b in node.bases]))
    assert engine_classes and all(bases == ["Engine"] for _, bases in engine_classes), engine_classes


def test_the_probe_check_sees_a_planted_probe(tmp_path):
    (tmp_path / "service" / "core").mkdir(parents=True)
    (tmp_path / "service" / "core" / "rogue.py").write_text(
        "def size(model):\n    return getattr(model, 'num_classes', 0) if hasattr(model, 'labels') else 0\n")
    assert _probes(tmp_path) == {("service/core/rogue.py", "getattr(model, 'num_classes', 0)"),
                                 ("service/core/rogue.py", "hasattr(model, 'labels')")}


def test_buckets_and_warm_up_rounds_are_defined_once():
    """The batch-size buckets and the number of warm-up rounds have one definition, in engines/base.py
    (the metrics' histogram buckets are derived from it)."""
    definitions = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(_parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "batch_size_buckets":
                assert "batch_buckets" in {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
            elif isinstance(node, ast.FunctionDef) and node.name.startswith(("bucket", "batch_bucket")):
                definitions.append((node.name, path.relative_to(ROOT).as_posix()))
            if isinstance(node, ast.Assign) and any(ast.unparse(t) == "WARMUP_ROUNDS" for t in node.targets):
                definitions.append(("WARMUP_ROUNDS", path.relative_to(ROOT).as_posix()))
    assert sorted(definitions) == [("WARMUP_ROUNDS", "service/core/engines/base.py"),
                                   ("batch_buckets", "service/core/engines/base.py"),
                                   ("bucket_for", "service/core/engines/base.py")]


# -- Ray stays an optional extra ------------------------------------------------------------------------------
RAY_MODULES = ["service.cli.on_ray", "service.ray_data"]


def _imports_ray(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(name == "ray" or name.startswith("ray.") for name in names):
            return True
    return False


def test_only_the_ray_modules_import_ray():
    """Ray (the ``ray`` extra) is imported by the --ray job and the Ray Data predictor only, never by the
    server (core, HTTP, V2), the rest of the batch command or the model package: a server without Ray
    starts, and the extra's pins move nothing else."""
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "/pb/" not in p.as_posix()]
    importers = sorted(_module_name(p) for p in files if _imports_ray(_parse(p.read_text(), filename=str(p))))
    assert importers == RAY_MODULES
    planted = _parse("def f():\n    import ray.data\n\ndef g():\n    from ray.data import ActorPoolStrategy\n")
    assert _imports_ray(planted) and not _imports_ray(_parse("import rayon\nfrom .ray import x\n"))


def test_a_front_end_worker_imports_no_torch():
    """A worker of a server of several processes builds the whole app (every door, its remote registry)
    and decodes an image without importing torch (or an inference runtime): its memory is its own."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from service.core.engine_client import EngineAddress, RemoteRegistry\n"
        "from service.core.settings import ServerSettings\n"
        "from service.server.app import create_app\n"
        "import service.server.processes, service.v2.grpc_server\n"
        "address = EngineAddress('\\0x', '\\0y', 't', 0)\n"
        "app = create_app(ServerSettings(), engine=address, grpc_address='127.0.0.1:0')\n"
        "RemoteRegistry(ServerSettings(), address, decode_threads=1)\n"
        "from model import PreprocessConfig\n"
        "from service.core.imaging import Preprocessor\n"
        "Preprocessor(PreprocessConfig(224, 0.875), max_pixels=10**8)\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'onnx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
