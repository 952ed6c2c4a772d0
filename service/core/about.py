"""What this server is: its own version and the versions of the libraries that compute its answers
(``/info``, V2 server metadata, the OpenAPI document)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform


@functools.cache
def service_version() -> str:
    try:
        return importlib.metadata.version("effnet-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+local"


@functools.cache
def library_versions() -> dict[str, str]:
    # Read once: importlib.metadata parses each package's METADATA file, ~1 ms a package.
    versions = {"python": platform.python_version()}
    for dist in ("effnet-serve", "torch", "numpy", "pillow", "pillow-heif", "fastapi", "uvicorn", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
