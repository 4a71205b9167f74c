"""Every op and option family on every built path, small and jitted, forward and gradients
against the pure-JAX path: the quick subset (pytest -m "not slow") touches all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi
from conftest import IMPLEMENTATIONS

CASES = {
    "align-avg-sr2": lambda x, r, lv, impl: jax_roi.roi_align(x, r, (2, 3), spatial_scale=0.5, sampling_ratio=2,
                                                              implementation=impl),
    "align-max-adaptive-legacy": lambda x, r, lv, impl: jax_roi.roi_align(
        x, r, 2, spatial_scale=0.5, sampling_ratio=-1, aligned=False, reduction="max", implementation=impl),
    "warp-avg": lambda x, r, lv, impl: jax_roi.roi_warp(x, r, 2, spatial_scale=0.5, implementation=impl),
    "warp-max": lambda x, r, lv, impl: jax_roi.roi_warp(x, r, 2, spatial_scale=0.5, sampling_ratio=2,
                                                        reduction="max", implementation=impl),
    "pool-caffe": lambda x, r, lv, impl: jax_roi.roi_pool(x, r, 2, spatial_scale=0.5, implementation=impl),
    "pool-floor": lambda x, r, lv, impl: jax_roi.roi_pool(x, r, 3, spatial_scale=0.5, binning="floor",
                                                          implementation=impl),
    "multiscale": lambda x, r, lv, impl: jax_roi.multiscale_roi_align(
        lv, r, 2, spatial_scales=[0.5, 0.25], canonical_scale=4, canonical_level=2, sampling_ratio=2,
        implementation=impl),
}
BOX_GRADIENT = {"align-avg-sr2", "align-max-adaptive-legacy", "multiscale"}


def _inputs():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 8, 10, 4)), jnp.float32)
    rois = jnp.asarray([[0, 1, 1, 6, 5], [1, 0.5, 2, 9, 7], [0, -2, 3, 4, 12], [1, 3, 3, 17, 15],
                        [-1, 1, 1, 2, 2], [0, np.nan, 1, 2, 2]], jnp.float32)
    return x, rois, [x, x[:, ::2, ::2]]


def _run(op, impl, x, rois, levels):
    """Output and the gradients of ``sum(sin(output))``, in one compiled function."""
    def f(x, r, lv):
        out, vjp = jax.vjp(lambda x, r, lv: op(x, r, lv, impl), x, r, lv)
        return out, vjp(jnp.cos(out))
    return jax.jit(f)(x, rois, levels)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_op_on_path(implementation, case):
    x, rois, levels = _inputs()
    out, grads = _run(CASES[case], implementation, x, rois, levels)
    assert np.all(np.asarray(out)[-2:] == 0)  # padding and NaN rows
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    if case not in BOX_GRADIENT:
        assert np.all(np.asarray(grads[1]) == 0)
    if implementation != "xla":
        ref_out, ref_grads = _run(CASES[case], "xla", x, rois, levels)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
