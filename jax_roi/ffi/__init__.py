"""The XLA FFI kernel path: loads the compiled extension, registers its targets and wraps
the custom calls in ``jax.custom_vjp`` (``jax_roi.ffi.ops``).

``platforms()`` lists the platforms ("cpu", "cuda") whose kernels are built and
registered; it is empty when the extension is missing (``load_error()`` says why).
``cuda_emulated()`` is True when ``JAX_ROI_EMULATE_CUDA=1`` made the "cpu" targets run the
CUDA kernels' code on the host (for testing the CUDA kernels without a GPU).
"""

from jax_roi.ffi._loader import cuda_emulated, load_error, platforms

__all__ = ["cuda_emulated", "load_error", "platforms"]
