"""The CUDA kernel path lowers for CUDA without a GPU: the custom calls of the CUDA targets
appear in the lowered module (forward and backward of roi_align, roi_warp, roi_pool and the
multi-level op, under vmap too), with the ``deterministic`` attribute on the CUDA backward
calls only. Runs where the extension was built with CUDA (nvcc found at build time)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi
from jax_roi import ffi
from jax_roi.ffi import ops as ffi_ops

pytestmark = pytest.mark.skipif("cuda" not in ffi.platforms(),
                                reason="jax_roi._ext was built without the CUDA kernels")

ALIGN_FWD, ALIGN_BWD = "jax_roi_roi_align_fwd", "jax_roi_roi_align_bwd"
POOL_FWD, POOL_BWD = "jax_roi_roi_pool_fwd", "jax_roi_roi_pool_bwd"


def _inputs(num_levels=1):
    rng = np.random.default_rng(0)
    feats = [jnp.asarray(rng.standard_normal((2, 12 // 2**l, 16 // 2**l, 8)), jnp.float32)
             for l in range(num_levels)]
    rois = jnp.asarray([[0, 1, 1, 9, 7], [1, 2, 0, 14, 11], [-1, 0, 0, 4, 4]], jnp.float32)
    return feats, rois


def _lower(f, *args, platforms=("cuda",)):
    return jax.jit(f).trace(*args).lower(lowering_platforms=platforms).as_text()


def _calls(text, target):
    """The custom-call lines of `target` in the lowered text."""
    return [line for line in text.splitlines() if f"custom_call @{target}(" in line]


def _grad(f):
    return jax.grad(lambda x, r: jnp.sum(f(x, r) ** 2), argnums=(0, 1))


@pytest.mark.parametrize("kw", [dict(), dict(reduction="max"), dict(sampling_ratio=2, aligned=False)],
                         ids=["avg", "max", "legacy"])
def test_roi_align_forward_and_grad(kw):
    (x,), rois = _inputs()

    def f(x, r):
        return jax_roi.roi_align(x, r, (3, 4), spatial_scale=0.5, implementation="ffi", **kw)

    assert _calls(_lower(f, x, rois), ALIGN_FWD)
    text = _lower(_grad(f), x, rois)
    assert _calls(text, ALIGN_FWD)
    bwd = _calls(text, ALIGN_BWD)
    assert bwd and all(re.search(r"deterministic = 0", line) for line in bwd)
    assert all(re.search(r"rois_grad = 1", line) for line in bwd)


def test_roi_warp_forward_and_grad():
    (x,), rois = _inputs()

    def f(x, r):
        return jax_roi.roi_warp(x, r, 3, spatial_scale=0.5, implementation="ffi")

    text = _lower(_grad(f), x, rois)
    assert _calls(text, ALIGN_FWD)
    assert all(re.search(r"quantize = 1", line) for line in _calls(text, ALIGN_BWD))


@pytest.mark.parametrize("binning", ["caffe", "floor"])
def test_roi_pool_forward_and_grad(binning):
    (x,), rois = _inputs()

    def f(x, r):
        return jax_roi.roi_pool(x, r, 2, spatial_scale=0.5, binning=binning, implementation="ffi")

    assert _calls(_lower(f, x, rois), POOL_FWD)
    text = _lower(jax.grad(lambda x, r: jnp.sum(f(x, r) ** 2)), x, rois)
    assert _calls(text, POOL_FWD) and _calls(text, POOL_BWD)


def test_multilevel_forward_and_grad():
    feats, rois = _inputs(num_levels=3)
    scales = [0.5, 0.25, 0.125]
    level_ids = jnp.asarray([0, 2, 1], jnp.int32)

    def f(levels, r):
        return ffi_ops.multilevel_roi_align(levels, r, level_ids, (2, 2), spatial_scales=scales,
                                            sampling_ratio=2)

    assert _calls(_lower(f, feats, rois), ALIGN_FWD)
    text = _lower(_grad(f), feats, rois)
    (bwd,) = _calls(text, ALIGN_BWD)
    assert "spatial_scales" in bwd


def test_multiscale_public_op_lowers_to_the_kernels():
    feats, _ = _inputs(num_levels=2)
    boxes = jnp.asarray([[[0, 0, 20, 20], [2, 2, 6, 6]]] * 2, jnp.float32)

    def f(levels, b):
        return jax_roi.multiscale_roi_align(levels, b, 2, spatial_scales=[1 / 2, 1 / 4], implementation="ffi")

    text = _lower(_grad(f), feats, boxes)
    assert _calls(text, ALIGN_FWD) and _calls(text, ALIGN_BWD)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_deterministic_reaches_the_cuda_backward_only(op):
    (x,), rois = _inputs()
    if op == "align":
        def f(x, r):
            return ffi_ops.roi_align(x, r, (2, 2), spatial_scale=0.5, deterministic=True)
        target = ALIGN_BWD
    else:
        def f(x, r):
            return ffi_ops.roi_pool(x, r, (2, 2), spatial_scale=0.5, deterministic=True)
        target = POOL_BWD
    loss = jax.grad(lambda x, r: jnp.sum(f(x, r) ** 2))
    cuda = _calls(_lower(loss, x, rois), target)
    assert cuda and all("deterministic = 1" in line for line in cuda)
    cpu = _calls(_lower(loss, x, rois, platforms=("cpu",)), target)
    assert cpu and not any("deterministic" in line for line in cpu)


def test_multi_platform_lowering_keeps_both_kernels():
    (x,), rois = _inputs()

    def f(x, r):
        return jax_roi.roi_align(x, r, 2, spatial_scale=0.5, implementation="ffi")

    text = _lower(_grad(f), x, rois, platforms=("cpu", "cuda"))
    bwd = _calls(text, ALIGN_BWD)
    assert len(bwd) == 2  # one per platform branch
    assert sum("deterministic" in line for line in bwd) == 1  # the CUDA one


def test_vmap_lowers_to_one_cuda_call():
    (x,), rois = _inputs()
    boxes = jnp.stack([rois, rois + 1.0])

    def f(x, r):
        return jax.vmap(lambda rr: jax_roi.roi_align(x, rr, 2, spatial_scale=0.5, implementation="ffi"))(r)

    text = _lower(_grad(f), x, boxes)
    assert len(_calls(text, ALIGN_FWD)) == 1
    assert len(_calls(text, ALIGN_BWD)) == 1
