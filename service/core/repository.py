"""The model repository: several models in one server, each described by a ``model.toml`` in a folder of
its own (``EFFNET_MODEL_REPOSITORY``), as Triton and TorchServe lay theirs out.

    models/
      lite0/model.toml    variant = "efficientnet-lite0"                 (the packaged weights)
      birds/model.toml    variant = "efficientnet-b0"
                          weights = "birds.safetensors"
                          labels = "labels.txt"
                          max_batch_size = 16

The folder's name is the model's name. A ``model.toml`` sets a model's settings (``ModelSettings``, the
keys are its field names): ``variant`` (``EFFNET_MODEL``), the checkpoint and its labels, the
preprocessing, and the engine and batching settings. Paths are relative to the model's folder. What it
does not say about the checkpoint comes from the checkpoint (never from ``EFFNET_WEIGHTS``); the engine
and batching settings it does not give are the ``EFFNET_*`` values. Anything else is refused with the model's name, the
file and the key, so a typo never falls back to a default silently.

Reading is cheap and has no side effects: ``ModelRepository.spec(name)`` reads the file again each time,
so a reload picks up a changed ``model.toml`` or checkpoint.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from pydantic import ValidationError

from service.core.errors import StartupError
from service.core.settings import IDENTITY_FIELDS, ModelSettings, ModelSpec

MODEL_FILE = "model.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# A model.toml's keys are ModelSettings' fields, except that the network is its ``variant``.
FILE_KEY = {"model": "variant"}
SETTING = {key: field for field, key in FILE_KEY.items()}
PATH_KEYS = ("weights", "labels", "int8_model", "calibration_dir", "cache_dir")


def _file_key(field: str) -> str:
    return FILE_KEY.get(field, field)


def _problems(exc: ValidationError) -> str:
    """A refused model.toml in one line, each problem under its key's name in the file."""
    return "; ".join((f"{_file_key(str(e['loc'][0]))}: " if e["loc"] else "") + e["msg"] for e in exc.errors())


class ModelRepository:
    """The folder of models. ``names()`` lists them; ``spec(name)`` reads one (``StartupError`` naming the
    model, its file and the problem)."""

    def __init__(self, root: str | Path, base: ModelSettings) -> None:
        self.root = Path(root)
        self.base = base
        if not self.root.is_dir():
            raise StartupError(f"EFFNET_MODEL_REPOSITORY {str(self.root)!r} is not a folder")
        given = sorted(f"EFFNET_{field.upper()}" for field in IDENTITY_FIELDS if field in base.model_fields_set)
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

    def _settings(self, raw: dict[str, Any], folder: Path, where: str) -> ModelSettings:
        keys = {_file_key(field) for field in ModelSettings.model_fields}
        unknown = sorted(set(raw) - keys)
        if unknown:
            raise StartupError(f"{where}: unknown key(s) {', '.join(unknown)}; a model.toml may set "
                               f"{', '.join(sorted(keys))}")
        if "variant" not in raw:
            raise StartupError(f"{where}: no 'variant' (e.g. variant = \"efficientnet-b0\")")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in PATH_KEYS and isinstance(value, str) and value.strip() and value.strip().lower() != "random":
                value = str((folder / value).resolve())
            elif key in ("mean", "std") and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            values[SETTING.get(key, key)] = value
        # The environment's model settings, less the identity (each model's comes from its own file: given
        # explicitly, so the environment can never fill in EFFNET_WEIGHTS or EFFNET_LABELS).
        inherited = self.base.model_dump(include=self.base.model_fields_set - set(IDENTITY_FIELDS))
        identity = {field: ModelSettings.model_fields[field].default for field in IDENTITY_FIELDS}
        try:
            return ModelSettings(**{**inherited, **identity, **values})
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
