"""The XLA FFI kernel path.

``_loader`` loads the compiled extension and registers its targets; ``targets`` names the
targets and their attributes; ``primitives`` turns them into JAX primitives (abstract
evaluation, lowering per platform); ``batching`` and ``differentiation`` hold the
primitives' ``vmap`` and derivative rules; ``folding`` and ``partition`` fold mapped axes
into one call and keep a batch-sharded ``jit`` local; ``fallback`` is the same computation
in pure JAX; ``ops`` the canonical-form functions the public API dispatches to.

``platforms()`` lists the platforms ("cpu", "cuda") whose kernels are built and
registered; it is empty when the extension is missing (``load_error()`` says why).
``cuda_emulated()`` is True when ``JAX_ROI_EMULATE_CUDA=1`` made the "cpu" targets run the
CUDA kernels' code on the host (for testing the CUDA kernels without a GPU).
"""

from jax_roi.ffi._loader import cuda_emulated, load_error, platforms

__all__ = ["cuda_emulated", "load_error", "platforms"]
