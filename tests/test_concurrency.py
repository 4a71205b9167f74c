"""The same jitted kernel path called from several Python threads at once gives what it
gives serially; registering the FFI targets is idempotent and thread-safe."""

import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from conftest import IMPLEMENTATIONS, random_rois

import jax_roi
from jax_roi.ffi import _loader


def test_threads_match_serial():
    rng = np.random.default_rng(21)
    inputs = [(jnp.asarray(rng.standard_normal((2, 12, 14, 8)), jnp.float32),
               jnp.asarray(random_rois(rng, 2, 12, 14, 30), jnp.float32)) for _ in range(6)]
    for impl in IMPLEMENTATIONS:
        fwd = jax.jit(lambda f, r, impl=impl: jax_roi.roi_align(f, r, 3, sampling_ratio=-1, implementation=impl))
        # Threads must reproduce the serial bits: on a GPU the kernels' default backward uses
        # atomics (order-dependent sums), so the deterministic one is asked for there.
        det = dict(deterministic=True) if impl == "ffi" and jax.default_backend() == "gpu" else {}
        bwd = jax.jit(jax.grad(lambda f, r, impl=impl, det=det: jnp.sum(
            jax_roi.roi_align(f, r, 3, reduction="max", implementation=impl, **det) ** 2), argnums=(0, 1)))
        serial = [(np.asarray(fwd(f, r)), *map(np.asarray, bwd(f, r))) for f, r in inputs]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(3):
                threaded = list(pool.map(lambda fr: (np.asarray(fwd(*fr)), *map(np.asarray, bwd(*fr))), inputs))
                for a, b in zip(serial, threaded):
                    for x, y in zip(a, b):
                        np.testing.assert_array_equal(x, y)


def test_registration_is_idempotent_and_thread_safe():
    first = _loader.load()
    barrier = threading.Barrier(8)

    def register():
        barrier.wait()
        return _loader.load()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: register(), range(8)))
    assert all(r == first for r in results)
    # registering the same capsules with JAX again is harmless too
    ext = _loader._state.get("ext")
    if ext is not None:
        # the "cpu" targets in effect (the emulated CUDA ones under JAX_ROI_EMULATE_CUDA=1)
        registered = ext.emulated_cuda_targets() if _loader.cuda_emulated() else ext.cpu_targets()
        for name, capsule in registered.items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    out = jax_roi.roi_align(jnp.ones((1, 4, 4, 1)), jnp.array([[0, 0, 0, 3, 3.0]]), 1)
    np.testing.assert_allclose(float(out[0, 0, 0, 0]), 1.0, rtol=1e-12)
