"""The backend registry: one name per backend, known to the board files without importing any backend.

Backends are found two ways, both by name:

* installed packages declare them as entry points in the ``bitfold.backends`` group
  (bitfold's own: ``tvm``, ``open-fpga``, ``finn``, in its ``pyproject.toml``); they are imported
  only when first used, so a backend's heavy dependency is needed only for that backend;
* :func:`register_backend` adds one at run time (a plugin, or a test's toy backend).

A backend is an object with the interface of :class:`bitfold.export.backends.Backend`.
"""
from __future__ import annotations

from importlib.metadata import entry_points

from bitfold.core.errors import BitfoldError

GROUP = "bitfold.backends"
_RUNTIME: dict[str, object] = {}
_LOADED: dict[str, object] = {}


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def register_backend(name: str, backend) -> None:
    """Register ``backend`` (an instance, or a class that is instantiated without arguments) under ``name``."""
    if not isinstance(name, str) or not name:
        raise BitfoldError(f"backend name {name!r} must be a non-empty string")
    _RUNTIME[name] = backend
    _LOADED.pop(name, None)


def unregister_backend(name: str) -> None:
    _RUNTIME.pop(name, None)
    _LOADED.pop(name, None)


def backend_names() -> list[str]:
    return sorted(set(_entry_points()) | set(_RUNTIME))


def get_backend(name: str):
    """The backend registered under ``name``; one clear error listing the known ones otherwise."""
    if name in _LOADED:
        return _LOADED[name]
    if name in _RUNTIME:
        obj = _RUNTIME[name]
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise BitfoldError(f"no backend named {name!r} is registered",
                               f"known backends: {', '.join(backend_names())}")
        obj = ep.load()
    inst = obj() if isinstance(obj, type) else obj
    _LOADED[name] = inst
    return inst
