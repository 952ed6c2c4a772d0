"""The model repository: several models in one server, each described by a ``model.toml`` in a folder of
its own (``EFFNET_MODEL_REPOSITORY``), as Triton and TorchServe lay theirs out.

    models/
      lite0/model.toml    variant = "efficientnet-lite0"                 (the packaged weights)
      birds/model.toml    variant = "efficientnet-b0"
                          weights = "birds.safetensors"
                          labels = "labels.txt"
                          max_batch_size = 16

The folder's name is the model's name. A ``model.toml`` sets what the single-model ``EFFNET_*`` settings
set for one model: ``variant`` (``EFFNET_MODEL``), the checkpoint and its labels, the preprocessing, and the
engine and batching settings. Paths are relative to the model's folder. What it does not say about the
checkpoint comes from the checkpoint (never from ``EFFNET_WEIGHTS``); the engine and batching settings it
does not give are the server's ``EFFNET_*`` values. Anything else is refused with the model's name, the
file and the key, so a typo never falls back to a default silently.

Reading is cheap and has no side effects: ``ModelRepository.spec(name)`` reads the file again each time,
so a reload picks up a changed ``model.toml`` or checkpoint.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from pydantic import ValidationError

from service.core.errors import StartupError
from service.core.settings import Settings

MODEL_FILE = "model.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# The model's identity: set only by its model.toml (the setting it maps to; ``variant`` is EFFNET_MODEL).
IDENTITY_KEYS = {
    "variant": "model", "weights": "weights", "labels": "labels", "weights_format": "weights_format",
    "input_size": "input_size", "resize_size": "resize_size", "crop_fraction": "crop_fraction",
    "interpolation": "interpolation", "mean": "mean", "std": "std", "int8_model": "int8_model",
    "calibration_dir": "calibration_dir",
}
# How it runs: the server's EFFNET_* value unless its model.toml says otherwise.
RUN_KEYS = ("device", "dtype", "backend", "max_batch_size", "max_batch_delay_ms", "max_queue",
            "max_concurrent_batches", "cuda_graphs", "warmup")
PATH_KEYS = ("weights", "labels", "int8_model", "calibration_dir")


@dataclass(frozen=True)
class ModelSpec:
    """One model as the repository describes it: its name, its file and the settings that load it."""

    name: str
    source: str  # where it was described (the model.toml's path), for messages
    settings: Settings  # not resolved: ``load_model`` resolves them


def _problems(exc: ValidationError) -> str:
    """A refused model.toml in one line, each problem under its key's name in the file."""
    keys = {setting: key for key, setting in IDENTITY_KEYS.items()}
    return "; ".join((f"{keys.get(str(e['loc'][0]), e['loc'][0])}: " if e["loc"] else "") + e["msg"]
                     for e in exc.errors())


class ModelRepository:
    """The folder of models. ``names()`` lists them; ``spec(name)`` reads one (``StartupError`` naming the
    model, its file and the problem)."""

    def __init__(self, root: str | Path, base: Settings) -> None:
        self.root = Path(root)
        self.base = base
        if not self.root.is_dir():
            raise StartupError(f"EFFNET_MODEL_REPOSITORY {str(self.root)!r} is not a folder")
        given = sorted(f"EFFNET_{IDENTITY_KEYS[k].upper()}" for k in IDENTITY_KEYS
                       if IDENTITY_KEYS[k] in base.model_fields_set)
        if given:
            raise StartupError(
                f"{', '.join(given)} describe(s) a single model and cannot be combined with "
                "EFFNET_MODEL_REPOSITORY: put them in each model's model.toml"
            )

    def names(self) -> list[str]:
        """Every model in the repository: the sub-folders holding a model.toml, by name."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / MODEL_FILE).is_file())

    def __contains__(self, name: str) -> bool:
        return NAME_RE.match(name) is not None and (self.root / name / MODEL_FILE).is_file()

    def spec(self, name: str) -> ModelSpec:
        folder = self.root / name
        path = folder / MODEL_FILE
        where = f"model '{name}' ({path})"
        if not NAME_RE.match(name):
            raise StartupError(f"model name {name!r} is not allowed: use letters, digits, '_', '.' and '-'")
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise StartupError(f"{where}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise StartupError(f"{where}: not valid TOML: {exc}") from None
        return ModelSpec(name, str(path), self._settings(raw, folder, where))

    def _settings(self, raw: dict[str, Any], folder: Path, where: str) -> Settings:
        unknown = sorted(set(raw) - set(IDENTITY_KEYS) - set(RUN_KEYS))
        if unknown:
            known = ", ".join(sorted([*IDENTITY_KEYS, *RUN_KEYS]))
            raise StartupError(f"{where}: unknown key(s) {', '.join(unknown)}; a model.toml may set {known}")
        if "variant" not in raw:
            raise StartupError(f"{where}: no 'variant' (e.g. variant = \"efficientnet-b0\")")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in PATH_KEYS and isinstance(value, str) and value.strip() and value.strip().lower() != "random":
                value = str((folder / value).resolve())
            elif key in ("mean", "std") and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            values[IDENTITY_KEYS.get(key, key)] = value
        # The server's settings, less the single-model identity (each model's comes from its own file:
        # given explicitly, so the environment can never fill in EFFNET_WEIGHTS or EFFNET_LABELS).
        server = self.base.model_dump(include=self.base.model_fields_set - set(IDENTITY_KEYS.values()))
        identity = {field: Settings.model_fields[field].default for field in IDENTITY_KEYS.values()}
        try:
            return Settings(**{**server, **identity, **values})
        except ValidationError as exc:
            raise StartupError(f"{where}: {_problems(exc)}") from None
        except ValueError as exc:
            raise StartupError(f"{where}: {exc}") from None

    def startup_names(self, wanted: str | None) -> list[str]:
        """The models to load at start: ``EFFNET_MODELS`` (each must exist) or every one; never none."""
        available = self.names()
        if wanted:
            names = [n.strip() for n in wanted.split(",") if n.strip()]
            missing = [n for n in names if n not in available]
            if missing:
                raise StartupError(f"EFFNET_MODELS names {', '.join(missing)}, not in the repository "
                                   f"{self.root} (it has: {', '.join(available) or 'nothing'})")
            return list(dict.fromkeys(names))
        if not available:
            raise StartupError(f"the model repository {self.root} holds no model (no sub-folder with a {MODEL_FILE})")
        return available
