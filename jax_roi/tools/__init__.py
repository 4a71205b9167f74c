"""Tools around the library, not part of it: the command line (``python -m jax_roi``,
``jax-roi``), the demo, the benchmark runner and the sampling picture.

Nothing in the core package (``jax_roi.ops``, ``jax_roi.xla``, ``jax_roi.ffi``, the Flax
modules) imports this subpackage. Its optional dependencies (matplotlib for pictures, tqdm
for progress bars, torchvision as a benchmark peer) are imported only where they are used,
and every command says what it skipped and how to install it when one is missing.
"""
