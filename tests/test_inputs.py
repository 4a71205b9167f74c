"""Every trace-time error: raised as ValueError/TypeError, naming the argument, what was
expected and what was given (one test per message)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi

F = jnp.zeros((2, 8, 8, 3), jnp.float32)
ROIS = jnp.array([[0, 1, 1, 4, 4]], jnp.float32)
BOXES = jnp.zeros((2, 5, 4), jnp.float32)


def _raises(cls, *fragments):
    pattern = ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(cls, match=pattern)


CASES = [
    # (call, error class, fragments that must appear in order)
    (lambda: jax_roi.roi_align(F[0, 0], ROIS, 2), ValueError, ("features:", "rank >= 3", "shape (8, 3)")),
    (lambda: jax_roi.roi_align(F, jnp.zeros((4, 3)), 2), ValueError, ("boxes:", "[K, 5]", "shape (4, 3)")),
    (lambda: jax_roi.roi_align(F, jnp.zeros((4,)), 2), ValueError, ("boxes:", "[..., R, 4]", "shape (4,)")),
    (lambda: jax_roi.roi_align(F, jnp.zeros((1, 4, 5)), 2), ValueError, ("boxes:", "rank 2", "shape (1, 4, 5)")),
    (lambda: jax_roi.roi_align(F[0], ROIS, 2), ValueError, ("features:", "rank 4", "shape (8, 8, 3)")),
    (lambda: jax_roi.roi_align(F, jnp.zeros((3, 5, 4)), 2), ValueError, ("boxes:", "leading axes (2,)", "shape (3, 5, 4)")),
    (lambda: jax_roi.roi_align(F, ROIS, 0), ValueError, ("output_size:", ">= 1", "0")),
    (lambda: jax_roi.roi_align(F, ROIS, (2, 3, 4)), TypeError, ("output_size:", "pair of ints", "(2, 3, 4)")),
    (lambda: jax_roi.roi_align(F, ROIS, 2.5), TypeError, ("output_size:", "an int", "2.5")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, reduction="sum"), ValueError, ("reduction:", "'avg', 'max'", "'sum'")),
    (lambda: jax_roi.roi_pool(F, ROIS, 2, binning="round"), ValueError, ("binning:", "'caffe', 'floor'", "'round'")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, data_format="HWC"), ValueError, ("data_format:", "'NHWC', 'NCHW'", "'HWC'")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, implementation="cuda"), ValueError,
     ("implementation:", "None, 'xla', 'ffi'", "'cuda'")),
    (lambda: jax_roi.roi_align(F.astype(jnp.int32), ROIS, 2), TypeError, ("features:", "float16, bfloat16", "int32")),
    (lambda: jax_roi.roi_align(F, ROIS.astype(jnp.complex64), 2), TypeError, ("boxes:", "real-valued", "complex64")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, spatial_scale=0.0), ValueError, ("spatial_scale:", "> 0", "0.0")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, spatial_scale=jnp.float32(0.5) + jnp.zeros(())), TypeError,
     ("spatial_scale:", "static", "Array")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, sampling_ratio=1.5), TypeError, ("sampling_ratio:", "int", "1.5")),
    (lambda: jax_roi.roi_align(F, ROIS, 2, aligned="yes"), TypeError, ("aligned:", "a bool", "'yes'")),
    (lambda: jax_roi.roi_pool(F, ROIS, 2, deterministic=1), TypeError, ("deterministic:", "a bool", "int 1")),
    (lambda: jax_roi.multiscale_roi_align(F, BOXES, 2, spatial_scales=[0.25]), TypeError,
     ("features:", "list or tuple of feature levels", "ArrayImpl")),
    (lambda: jax_roi.multiscale_roi_align([F, F[:, :4, :4]], BOXES, 2, spatial_scales=[0.25]), ValueError,
     ("spatial_scales:", "one scale per level (2 levels)", "1")),
    (lambda: jax_roi.multiscale_roi_align([F, F[:1, :4, :4]], BOXES, 2, spatial_scales=[0.25, 0.125]), ValueError,
     ("features[1]:", "leading axes", "shape (1, 4, 4, 3)")),
    (lambda: jax_roi.multiscale_roi_align([F, F[:, :4, :4].astype(jnp.float16)], BOXES, 2,
                                          spatial_scales=[0.25, 0.125]), TypeError,
     ("features[1]:", "dtype float32", "float16")),
    (lambda: jax_roi.multiscale_roi_align([F, F[:, :4, :4]], BOXES, 2, spatial_scales=[0.25, 0.2]), ValueError,
     ("spatial_scales[1]:", "power of two", "0.2")),
    (lambda: jax_roi.multiscale_roi_align([F, F[:, :4, :4]], BOXES, 2, spatial_scales=[0.25, 0.0625]), ValueError,
     ("spatial_scales:", "consecutive levels", "[0.25, 0.0625]")),
    (lambda: jax_roi.multiscale_roi_align([F], BOXES, 2, spatial_scales=0.25), TypeError,
     ("spatial_scales:", "list or tuple", "float")),
    (lambda: jax_roi.fpn_levels(jnp.zeros((3, 5)), [0.25, 0.125]), ValueError, ("boxes:", "[..., 4]", "shape (3, 5)")),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_error_message(case):
    call, cls, fragments = CASES[case]
    with _raises(cls, *fragments):
        call()


def test_errors_raise_at_trace_time_under_jit():
    with _raises(ValueError, "reduction:", "'sum'"):
        jax.jit(lambda f, r: jax_roi.roi_align(f, r, 2, reduction="sum"))(F, ROIS)


def test_ffi_request_without_extension(monkeypatch):
    from jax_roi import ffi, ops

    monkeypatch.setattr(ffi, "platforms", lambda: ())
    monkeypatch.setattr(ops._ffi, "platforms", lambda: ())
    with _raises(RuntimeError, "implementation:", "not built", "'ffi'"):
        jax_roi.roi_align(F, ROIS, 2, implementation="ffi")
    out = jax_roi.roi_align(np.ones((1, 4, 4, 1), np.float32), np.array([[0, 0, 0, 3, 3]], np.float32), 1)
    assert float(out[0, 0, 0, 0]) == 1.0


def test_limits_are_checked_at_trace_time():
    """The limits the kernels' handlers enforce are checked first, with the argument named."""
    from jax_roi import _inputs

    feats, rois = jnp.zeros((1, 4, 4, 2)), jnp.asarray([[0, 0, 0, 2, 2.0]])
    for impl in ("xla", None):
        with pytest.raises(ValueError, match=r"sampling_ratio: expected at most 1024 .* got 1025"):
            jax_roi.roi_align(feats, rois, 2, sampling_ratio=1025, implementation=impl)
    assert jax_roi.roi_align(feats, rois, 1, sampling_ratio=_inputs.MAX_SAMPLING_RATIO,
                             implementation="xla").shape == (1, 1, 1, 2)
    levels = [jnp.zeros((1, 2, 2, 2))] * (_inputs.MAX_LEVELS + 1)
    with pytest.raises(ValueError, match=r"spatial_scales: expected between 1 and 32 levels, got 33"):
        jax_roi.multiscale_roi_align(levels, rois, 2, spatial_scales=[2.0 ** -k for k in range(33)])
    with pytest.raises(ValueError, match=r"features: expected at most 32 levels, got 33 levels"):
        jax_roi.multiscale_roi_align(levels, rois, 2, spatial_scales=[2.0 ** -k for k in range(32)])
