"""Loads ``jax_roi._ext`` and registers its FFI targets with JAX, once.

Where the extension comes from, first found wins:

1. ``jax_roi._ext`` next to this package (an installed or in-place build);
2. the ``_ext`` of an installed ``jax_roi`` distribution, when this package is a source
   checkout without one (``python -m pytest`` from the repository root puts the source
   tree first on ``sys.path``; this finds the extension ``pip install .`` built). It is
   used only if its ``abi_version`` matches :data:`ABI_VERSION`.

Registration is idempotent and thread-safe: the first call registers every target under a
lock; later calls return the cached result.

With the environment variable ``JAX_ROI_EMULATE_CUDA=1`` set before the first call, the CPU
targets are the CUDA kernels compiled for the host (``_ext.emulated_cuda_targets()``: the
CUDA targets' names and attributes, the backward's ``deterministic`` included) instead of
the CPU kernels; :func:`cuda_emulated` says whether that is in effect.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading

import jax

# The operand/attribute layout the Python side speaks (module.cc's abi_version).
ABI_VERSION = 3

_lock = threading.Lock()
_state: dict = {}


def _installed_extension_path() -> str | None:
    """Path of ``_ext`` in an installed ``jax_roi`` distribution, if any."""
    try:
        from importlib import metadata
        dist = metadata.distribution("jax_roi")
    except Exception:  # not installed
        return None
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for f in dist.files or ():
        name = str(f).replace("\\", "/")
        if name.startswith("jax_roi/_ext") and name.endswith(suffixes):
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return path
    return None


def _import_extension():
    """The ``_ext`` module, or None with the reason."""
    try:
        from jax_roi import _ext
        return _ext, None
    except ImportError as e:
        local_error = e
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = _installed_extension_path()
    if path is None or os.path.dirname(os.path.abspath(path)) == here:
        return None, f"jax_roi._ext is not built ({local_error})"
    try:
        spec = importlib.util.spec_from_file_location("jax_roi._ext", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # an unloadable build
        return None, f"jax_roi._ext at {path} failed to load: {e}"
    if getattr(module, "abi_version", None) != ABI_VERSION:
        return None, (f"jax_roi._ext at {path} has abi_version {getattr(module, 'abi_version', None)}, "
                      f"expected {ABI_VERSION}; reinstall with `pip install .`")
    sys.modules.setdefault("jax_roi._ext", module)
    return module, None


def _register():
    ext, error = _import_extension()
    if ext is None:
        return (), error, None
    if getattr(ext, "abi_version", ABI_VERSION) != ABI_VERSION:
        return (), (f"jax_roi._ext has abi_version {ext.abi_version}, expected {ABI_VERSION}; "
                    "rebuild with `pip install .`"), ext
    built = []
    cpu = ext.cpu_targets()
    emulated = os.environ.get("JAX_ROI_EMULATE_CUDA", "") == "1"
    if emulated:
        emulated_targets = ext.emulated_cuda_targets() if hasattr(ext, "emulated_cuda_targets") else {}
        if set(emulated_targets) != set(cpu):
            return (), ("JAX_ROI_EMULATE_CUDA=1, but jax_roi._ext has no emulated CUDA targets; "
                        "rebuild with `pip install .`"), ext
        cpu = emulated_targets
    _state["emulated"] = emulated
    for name, capsule in cpu.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    if cpu:
        built.append("cpu")
    cuda = ext.cuda_targets() if getattr(ext, "has_cuda", False) else {}
    for name, capsule in cuda.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    if cuda:
        # "gpu" too: jax.default_backend() names a CUDA backend "gpu", and callers test
        # `jax.default_backend() in platforms()`. (On ROCm the ops' platform_dependent
        # has no rocm branch, so they would run the pure-JAX path there.)
        built += ["cuda", "gpu"]
    return tuple(built), None, ext


def load() -> tuple[tuple[str, ...], str | None]:
    """Registers the targets (first call only); returns ``(platforms, error)``."""
    if "platforms" in _state:
        return _state["platforms"], _state["error"]
    with _lock:
        if "platforms" not in _state:
            built, error, ext = _register()
            _state["ext"] = ext
            _state["error"] = error
            _state["platforms"] = built  # written last: the lock-free read above keys on it
    return _state["platforms"], _state["error"]


def cuda_emulated() -> bool:
    """Whether the CPU targets run the CUDA kernels' code (``JAX_ROI_EMULATE_CUDA=1`` when
    the targets were registered)."""
    load()
    return bool(_state.get("emulated", False)) and bool(_state["platforms"])


def platforms() -> tuple[str, ...]:
    """Platforms with built and registered kernels (empty without the extension)."""
    return load()[0]


def load_error() -> str | None:
    """Why no kernels are available, or None."""
    return load()[1]
