"""Loads ``jax_roi._ext`` and registers its FFI targets with JAX, once."""

from __future__ import annotations

import functools


@functools.cache
def platforms() -> tuple[str, ...]:
    """Platforms with built and registered kernels (empty without the extension)."""
    try:
        from jax_roi import _ext  # noqa: F401
    except ImportError:
        return ()
    return ()
