"""The XLA FFI kernel path: loads the compiled extension, registers its targets and wraps
the custom calls in ``jax.custom_vjp``.

``platforms()`` lists the platforms ("cpu", "cuda") whose kernels are built and
registered; it is empty when the extension is missing.
"""

from jax_roi.ffi._loader import platforms

__all__ = ["platforms"]
