"""The XLA FFI kernel path: loads the compiled extension, registers its targets and wraps
the custom calls in ``jax.custom_vjp`` (``jax_roi.ffi.ops``).

``platforms()`` lists the platforms ("cpu", "cuda") whose kernels are built and
registered; it is empty when the extension is missing (``load_error()`` says why).
"""

from jax_roi.ffi._loader import load_error, platforms

__all__ = ["load_error", "platforms"]
