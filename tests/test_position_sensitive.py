"""ps_roi_align / ps_roi_pool (R-FCN): torchvision's golden outputs and gradients in float32
and float64, the float64 oracle with every edge box, gradients in features and boxes by
central differences, the box forms and layouts, transforms, and the argument errors; then
the kernel path (implementation="ffi"): golden data, the pure-JAX path and the oracle on
random and edge boxes in every dtype, feature and box gradients, bounded time on absurd
boxes, vmap / jit / jacrev / jvp, the raw targets' checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOUNDED_TIME_S, timed_forward_backward, DEAD_ROWS, TOLERANCE, random_rois

import jax_roi
import reference as R
from jax_roi import ffi

HAS_KERNELS = "cpu" in ffi.platforms()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="the FFI CPU kernels are not built")


def _golden_cases(golden):
    for tag, (op, f64, s, sr, oh, ow) in zip(golden["ps_tags"], golden["ps_params"]):
        yield str(tag), int(op), np.float64 if f64 else np.float32, float(s), int(sr), (int(oh), int(ow))


def _op(op, size, s, sr):
    if op == 0:
        return lambda f, r: jax_roi.ps_roi_align(f, r, size, spatial_scale=s, sampling_ratio=sr)
    return lambda f, r: jax_roi.ps_roi_pool(f, r, size, spatial_scale=s)


def test_torchvision_golden(golden_data):
    """Outputs of both ops (torchvision's 0/0 NaN is 0 here) and ps_roi_align's feature
    gradient, in the data's dtype: float32 at 1e-5, float64 at 1e-10. torchvision's
    ps_roi_pool backward clips the bins to the whole map where its forward stops one cell
    short, so it is not the forward's transpose; ours is (checked against the oracle below)."""
    g = golden_data
    rois = g["pool_rois"]
    for tag, op, dtype, s, sr, size in _golden_cases(g):
        tol = 1e-10 if dtype == np.float64 else 1e-5
        fn = _op(op, size, s, sr)
        r = jnp.asarray(rois.astype(dtype))
        feats = jnp.asarray(g[f"{tag}_features_nhwc"])
        out, pullback = jax.vjp(lambda f: fn(f, r), feats)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, np.nan_to_num(g[f"{tag}_out_nhwc"]), atol=tol, rtol=tol, err_msg=tag)
        if op == 0:
            d_f = pullback(jnp.asarray(g[f"{tag}_cot_nhwc"]))[0]
            np.testing.assert_allclose(d_f, g[f"{tag}_dfeat_nhwc"], atol=tol, rtol=tol, err_msg=tag)


def _inputs(seed, size, dtype=np.float64, c_out=2):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2, 9, 11, c_out * size[0] * size[1])).astype(dtype)
    rois = random_rois(rng, 2, 9, 11, 12, scale=0.5)
    return jnp.asarray(feats), jnp.asarray(rois.astype(dtype)), rng


@pytest.mark.parametrize("size, sr", [((3, 2), 2), ((2, 2), -1), ((1, 3), 0)])
def test_matches_oracle_with_gradients(size, sr):
    feats, rois, rng = _inputs(1, size)
    out = jax_roi.ps_roi_align(feats, rois, size, spatial_scale=0.5, sampling_ratio=sr)
    np.testing.assert_allclose(out, R.ps_roi_align_ref(feats, rois, size, 0.5, sr), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    assert float(jnp.max(jnp.abs(out))) > 0.1
    cot = rng.standard_normal(out.shape)
    d_f, d_r = jax.grad(lambda f, r: jnp.sum(jax_roi.ps_roi_align(f, r, size, spatial_scale=0.5,
                                                                  sampling_ratio=sr) * cot), argnums=(0, 1))(feats, rois)
    want_f, want_r = R.ps_roi_align_ref_vjp(feats, rois, size, cot, 0.5, sr)
    np.testing.assert_allclose(d_f, want_f, atol=1e-12)
    finite = np.all(np.isfinite(np.asarray(rois)), axis=1)
    np.testing.assert_allclose(np.asarray(d_r)[finite], want_r[finite], atol=1e-9)
    assert np.all(np.isfinite(np.asarray(d_r)))

    pooled = jax_roi.ps_roi_pool(feats, rois, size, spatial_scale=0.5)
    np.testing.assert_allclose(pooled, R.ps_roi_pool_ref(feats, rois, size, 0.5), atol=1e-12)
    d_f = jax.grad(lambda f: jnp.sum(jax_roi.ps_roi_pool(f, rois, size, spatial_scale=0.5) * cot))(feats)
    np.testing.assert_allclose(d_f, R.ps_roi_pool_ref_vjp(feats, rois, size, cot, 0.5)[0], atol=1e-12)


def test_box_gradient_by_central_differences():
    """ps_roi_align's derivative in all four box coordinates against central differences,
    on boxes away from the sampling grid's kinks."""
    size = (2, 2)
    rng = np.random.default_rng(3)
    feats = jnp.asarray(rng.standard_normal((1, 9, 11, 2 * 4)))
    rois = jnp.asarray([[0, 2.3, 1.7, 14.1, 12.6], [0, 5.2, 3.3, 18.9, 15.1]])
    cot = jnp.asarray(rng.standard_normal((2, 2, 2, 2)))

    def loss(r):
        return jnp.sum(jax_roi.ps_roi_align(feats, r, size, spatial_scale=0.5, sampling_ratio=2) * cot)

    grad = np.asarray(jax.grad(loss)(rois))
    eps = 1e-6
    for k in range(2):
        for j in range(1, 5):
            e = np.zeros((2, 5))
            e[k, j] = eps
            fd = (loss(rois + e) - loss(rois - e)) / (2 * eps)
            np.testing.assert_allclose(grad[k, j], fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_forms_layouts_and_transforms(op):
    """Per-image boxes equal the rois form, NCHW equals NHWC, and jit / vmap / jacfwd
    agree with the plain call."""
    size = (2, 3)
    feats, _, rng = _inputs(4, size)
    boxes = jnp.asarray(np.stack([random_rois(rng, 1, 9, 11, 4, scale=0.5, edge=False)[:, 1:] for _ in range(2)]))
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 4)[:, None], boxes.reshape(8, 4)], axis=1)
    fn = {"align": functools.partial(jax_roi.ps_roi_align, output_size=size, spatial_scale=0.5, sampling_ratio=2),
          "pool": functools.partial(jax_roi.ps_roi_pool, output_size=size, spatial_scale=0.5)}[op]
    flat = fn(feats, rois)
    np.testing.assert_allclose(fn(feats, boxes).reshape(flat.shape), flat, atol=1e-12)
    nchw = fn(jnp.moveaxis(feats, -1, 1), rois, data_format="NCHW")
    np.testing.assert_allclose(jnp.moveaxis(nchw, 1, -1), flat, atol=1e-12)
    np.testing.assert_allclose(jax.jit(fn)(feats, rois), flat, atol=1e-12)
    stacked = jax.vmap(fn, in_axes=(0, None))(jnp.stack([feats, 2 * feats]), rois)
    np.testing.assert_allclose(stacked[1], 2 * flat, atol=1e-12)
    jac = jax.jacfwd(lambda f: fn(f, rois[:2]))(feats)
    jac_rev = jax.jacrev(lambda f: fn(f, rois[:2]))(feats)
    np.testing.assert_allclose(jac, jac_rev, atol=1e-12)


def test_errors_name_the_argument():
    feats = jnp.zeros((1, 5, 5, 7))
    rois = jnp.asarray([[0, 1.0, 1, 3, 3]])
    with pytest.raises(ValueError, match=r"features: expected a channel count that is a positive multiple of "
                                         r"oh \* ow = 4 .*got 7 channels"):
        jax_roi.ps_roi_align(feats, rois, 2)
    with pytest.raises(ValueError, match=r"implementation: expected one of .*got 'cuda'"):
        jax_roi.ps_roi_pool(jnp.zeros((1, 5, 5, 8)), rois, 2, implementation="cuda")
    with pytest.raises(ValueError, match=r"features: expected a channel count .*got 7 channels"):
        jax_roi.ps_roi_pool(feats, rois, 2, implementation="ffi" if HAS_KERNELS else "xla")


@pytest.mark.parametrize("name", ["PSRoIAlign", "PSRoIPool"])
def test_linen_and_nnx_modules(name):
    """Stateless modules equal to the function (jit, ``dtype`` cast) in both Flax APIs."""
    from jax_roi import linen, nnx

    size = (2, 3)
    feats, rois, _ = _inputs(5, size, dtype=np.float32)
    fn = {"PSRoIAlign": functools.partial(jax_roi.ps_roi_align, sampling_ratio=2),
          "PSRoIPool": jax_roi.ps_roi_pool}[name]
    want = jax.jit(lambda f, r: fn(f, r, size, spatial_scale=0.5))(feats, rois)
    module = getattr(linen, name)(size, spatial_scale=0.5, **({"sampling_ratio": 2} if name == "PSRoIAlign" else {}))
    variables = module.init(jax.random.key(0), feats, rois)
    assert jax.tree_util.tree_leaves(variables) == []
    np.testing.assert_allclose(jax.jit(module.apply)(variables, feats, rois), want, atol=1e-6)
    n = getattr(nnx, name)(size, spatial_scale=0.5, dtype=jnp.bfloat16,
                           **({"sampling_ratio": 2} if name == "PSRoIAlign" else {}))
    out = n(feats, rois)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), want, atol=3e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- the kernels


def _kernel_op(op, impl, size, **kw):
    if op == "align":
        return lambda f, r: jax_roi.ps_roi_align(f, r, size, implementation=impl, **kw)
    kw.pop("sampling_ratio", None)
    return lambda f, r: jax_roi.ps_roi_pool(f, r, size, implementation=impl, **kw)


@needs_kernels
def test_kernels_torchvision_golden(golden_data):
    """The kernels on torchvision's data, float32 at 1e-5 and float64 at 1e-10: outputs of
    both ops, ps_roi_align's feature gradient, and ps_roi_pool's feature gradient against
    the oracle (the forward's transpose, see test_torchvision_golden)."""
    g = golden_data
    for tag, op, dtype, s, sr, size in _golden_cases(g):
        tol = 1e-10 if dtype == np.float64 else 1e-5
        fn = _kernel_op("align" if op == 0 else "pool", "ffi", size, spatial_scale=s, sampling_ratio=sr)
        r = jnp.asarray(g["pool_rois"].astype(dtype))
        feats = jnp.asarray(g[f"{tag}_features_nhwc"])
        cot = jnp.asarray(g[f"{tag}_cot_nhwc"])
        out, pullback = jax.vjp(lambda f: fn(f, r), feats)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, np.nan_to_num(g[f"{tag}_out_nhwc"]), atol=tol, rtol=tol, err_msg=tag)
        d_f = pullback(cot)[0]
        if op == 0:
            want = g[f"{tag}_dfeat_nhwc"]
        else:
            want = R.ps_roi_pool_ref_vjp(np.asarray(feats, np.float64), np.asarray(r), size, np.asarray(cot), s,
                                         coord_dtype=dtype)[0]
        np.testing.assert_allclose(d_f, want, atol=tol, rtol=tol, err_msg=tag)


SLOW = pytest.mark.slow  # the quick subset (-m "not slow") keeps one case of each op


@needs_kernels
@pytest.mark.parametrize("op, size, sr, c_out", [
    ("align", (3, 2), 2, 2), pytest.param("align", (2, 2), -1, 5, marks=SLOW),
    pytest.param("align", (1, 3), 0, 1, marks=SLOW), pytest.param("align", (2, 3), 3, 3, marks=SLOW),
    ("pool", (3, 2), None, 2), pytest.param("pool", (2, 2), None, 5, marks=SLOW),
    pytest.param("pool", (1, 3), None, 1, marks=SLOW),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_kernels_match_pure_jax_and_oracle(op, size, sr, c_out):
    """float64, random boxes and every edge box (empty, inverted, sub-pixel, padding, past
    the batch, NaN, inf, 1e30, off the map, covering it): outputs, feature gradients and
    (ps_roi_align) box gradients equal the pure-JAX path's and the oracle's; dead rows are
    zero with zero gradients."""
    feats, rois, rng = _inputs(20 + c_out, size, c_out=c_out)
    kw = dict(spatial_scale=0.5, sampling_ratio=sr)
    fn, ref_fn = _kernel_op(op, "ffi", size, **kw), _kernel_op(op, "xla", size, **kw)
    out = fn(feats, rois)
    assert out.shape == (rois.shape[0],) + size + (c_out,)
    np.testing.assert_allclose(out, ref_fn(feats, rois), atol=1e-12, rtol=1e-12)
    if op == "align":
        oracle = R.ps_roi_align_ref(feats, rois, size, 0.5, sr)
    else:
        oracle = R.ps_roi_pool_ref(feats, rois, size, 0.5)
    np.testing.assert_allclose(out, oracle, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    assert float(jnp.max(jnp.abs(out))) > 0.1
    cot = jnp.asarray(rng.standard_normal(out.shape))

    def grads(f):
        return jax.jit(jax.grad(lambda x, r: jnp.sum(f(x, r) * cot), argnums=(0, 1)))(feats, rois)

    (d_f, d_r), (x_f, x_r) = grads(fn), grads(ref_fn)
    np.testing.assert_allclose(d_f, x_f, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(d_r, x_r, atol=1e-10, rtol=1e-10)
    if op == "align":
        want_f, want_r = R.ps_roi_align_ref_vjp(feats, rois, size, cot, 0.5, sr)
        finite = np.all(np.isfinite(np.asarray(rois)), axis=1)
        np.testing.assert_allclose(np.asarray(d_r)[finite], want_r[finite], atol=1e-9)
        assert np.abs(np.asarray(d_r)).max() > 0
    else:
        want_f = R.ps_roi_pool_ref_vjp(feats, rois, size, cot, 0.5)[0]
        np.testing.assert_array_equal(d_r, 0)
    np.testing.assert_allclose(d_f, want_f, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(d_r)))
    np.testing.assert_array_equal(np.asarray(d_r)[DEAD_ROWS], 0)
    np.testing.assert_array_equal(np.asarray(d_r)[:, 0], 0)


def _dtype_cases():
    dtypes = [(np.float32, "f32"), (jnp.bfloat16, "bf16"), (np.float16, "f16"), (np.float64, "f64")]
    quick = {("align", "f32"), ("pool", "bf16")}
    return [pytest.param(op, d, id=f"{op}-{name}", marks=() if (op, name) in quick else SLOW)
            for op in ("align", "pool") for d, name in dtypes]


@needs_kernels
@pytest.mark.parametrize("op, dtype", _dtype_cases())
def test_kernels_dtypes(op, dtype):
    """Every feature dtype (16-bit floats accumulated in float32) against the pure-JAX path:
    outputs, feature gradients in the features' dtype, box gradients in the rois' dtype."""
    size = (2, 3)
    rng = np.random.default_rng(31)
    feats = jnp.asarray(rng.standard_normal((2, 9, 11, 3 * 6)), dtype)
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = jnp.asarray(random_rois(rng, 2, 9, 11, 12, scale=0.5).astype(coord))
    kw = dict(spatial_scale=0.5, sampling_ratio=-1)
    fn, ref_fn = _kernel_op(op, "ffi", size, **kw), _kernel_op(op, "xla", size, **kw)
    out = fn(feats, rois)
    assert out.dtype == jnp.dtype(dtype)
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref_fn(feats, rois), np.float64),
                               atol=atol, rtol=rtol)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)

    def grads(f):
        return jax.grad(lambda x, r: jnp.sum((f(x, r) * cot).astype(jnp.float32)), argnums=(0, 1))(feats, rois)

    (d_f, d_r), (x_f, x_r) = grads(fn), grads(ref_fn)
    assert d_f.dtype == jnp.dtype(dtype) and d_r.dtype == rois.dtype
    np.testing.assert_allclose(np.asarray(d_f, np.float64), np.asarray(x_f, np.float64), atol=4 * atol, rtol=rtol)
    scale = max(1.0, float(jnp.abs(x_r).max()))
    box_tol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-5
    np.testing.assert_allclose(d_r, x_r, atol=10 * box_tol * scale, rtol=10 * box_tol)


# The absurd boxes of test_ffi.py's EDGE_BOXES: 1e30 and 3e38 wide (overflowing float32 box
# lengths at scale 1), NaN and inf, far off the map.
EDGE_BOXES = np.array([
    [0, -1e30, -1e30, 1e30, 1e30], [1, -1e30, 3, 1e30, 20], [0, 2, -1e30, 30, 1e30],
    [0, -3e38, -3e38, 3e38, 3e38], [1, 3e38, 3e38, 3.4e38, 3.4e38], [0, -3.4e38, 1, 3.4e38, 9],
    [1, 1e30, 1e30, -1e30, -1e30], [0, -1e30, -1e30, -1e30 + 1e24, -1e30 + 1e24],
    [0, np.nan, 1, 5, 5], [1, 1, 1, np.inf, 5], [0, -np.inf, 1, 5, 5], [1, 1, -np.inf, 5, np.inf],
    [0, -4e3, -3e3, 4e3, 3e3], [1, -2e6, 1, 2e6, 25],
], np.float32)


@needs_kernels
@pytest.mark.parametrize("op, sr, dtype", [
    ("align", 2, np.float32), pytest.param("align", 0, np.float32, marks=SLOW),
    pytest.param("align", 0, np.float64, marks=SLOW), pytest.param("align", 2, np.float64, marks=SLOW),
    ("pool", None, np.float32), pytest.param("pool", None, np.float64, marks=SLOW),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_kernels_absurd_boxes_bounded_time_finite(op, sr, dtype):
    """1e30, 3e38, NaN and inf boxes at scales 1 and 0.5: the kernels agree with the pure-JAX
    path, the outputs and gradients are finite (zero rows for the non-finite boxes), and a
    forward plus backward takes under a second once compiled (adaptive counts are windowed,
    pooled bins clipped to the map)."""
    feats = jnp.asarray(np.random.default_rng(51).standard_normal((2, 24, 32, 4 * 4)), dtype)
    rois = jnp.asarray(EDGE_BOXES.astype(dtype))
    size = (2, 2)
    for scale in (1.0, 0.5):
        kw = dict(spatial_scale=scale, sampling_ratio=sr)
        fn, ref_fn = _kernel_op(op, "ffi", size, **kw), _kernel_op(op, "xla", size, **kw)
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda f, r: jnp.sum(fn(f, r) ** 2), argnums=(0, 1)))
        best, out, (d_f, d_r) = timed_forward_backward(fwd, bwd, feats, rois)
        assert best < BOUNDED_TIME_S, best
        for a in (out, d_f, d_r):
            assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(out)[8:12], 0)
        np.testing.assert_array_equal(np.asarray(d_r)[8:12], 0)
        tol = 1e-10 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(out, ref_fn(feats, rois), atol=tol, rtol=tol)
        x_f, x_r = jax.grad(lambda f, r: jnp.sum(ref_fn(f, r) ** 2), argnums=(0, 1))(feats, rois)
        np.testing.assert_allclose(d_f, x_f, atol=tol, rtol=tol)
        np.testing.assert_allclose(d_r, x_r, atol=tol * max(1.0, float(jnp.abs(x_r).max())), rtol=tol)


@needs_kernels
def test_kernels_empty_inputs():
    """No rois, no channels, a one-pixel map, a box with no samples."""
    for op in ("align", "pool"):
        fn = _kernel_op(op, "ffi", (2, 2), sampling_ratio=2)
        feats = jnp.asarray(np.random.default_rng(6).standard_normal((2, 5, 6, 8)))
        none = jnp.zeros((0, 5))
        assert fn(feats, none).shape == (0, 2, 2, 2)
        d_f, d_r = jax.grad(lambda f, r: jnp.sum(fn(f, r)), argnums=(0, 1))(feats, none)
        np.testing.assert_array_equal(d_f, 0)
        assert d_r.shape == (0, 5)
        # no channels (the public op refuses them; the canonical kernel op returns zeros)
        from jax_roi.ffi import ops as F
        canonical = getattr(F, "ps_roi_" + op)
        assert canonical(jnp.zeros((1, 4, 4, 0)), jnp.asarray([[0, 0, 0, 2, 2.0]]), (2, 2)).shape == (1, 2, 2, 0)
        one = jnp.asarray(np.random.default_rng(7).standard_normal((1, 1, 1, 4)))
        r = jnp.asarray([[0, -0.5, -0.5, 0.7, 0.9], [0, 0.3, 0.3, 0.3, 0.3]])
        ref = _kernel_op(op, "xla", (2, 2), sampling_ratio=2)
        np.testing.assert_allclose(fn(one, r), ref(one, r), atol=1e-12)
        np.testing.assert_allclose(jax.grad(lambda f: jnp.sum(fn(f, r) ** 2))(one),
                                   jax.grad(lambda f: jnp.sum(ref(f, r) ** 2))(one), atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("op", ["align", pytest.param("pool", marks=SLOW)])
def test_kernels_transforms(op):
    """jit, vmap (over the rois of a shared map: per-element gradient copies; over the maps:
    groups folded into one call), per-image boxes, jacrev and jvp agree with the pure-JAX
    path; one kernel call per direction in the lowered computation."""
    size = (2, 3)
    feats, rois, rng = _inputs(8, size)
    rois = rois[:8]
    kw = dict(spatial_scale=0.5, sampling_ratio=2)
    fn, ref_fn = _kernel_op(op, "ffi", size, **kw), _kernel_op(op, "xla", size, **kw)
    np.testing.assert_allclose(jax.jit(fn)(feats, rois), ref_fn(feats, rois), atol=1e-12)
    text = jax.jit(jax.grad(lambda f, r: jnp.sum(fn(f, r)), argnums=(0, 1))).lower(feats, rois).as_text()
    name = "ps_roi_align" if op == "align" else "ps_roi_pool"
    assert text.count(f"custom_call @jax_roi_{name}_bwd") == 1
    # vmap over rois (shared map) and over maps, with gradients
    stacked_rois = jnp.stack([rois, rois[::-1] + jnp.asarray([0, 0.5, -0.25, 0.3, 0.1])])
    stacked_feats = jnp.stack([feats, 2 * feats + 1])

    def loss(f_):
        return lambda x, r: jnp.sum(jax.vmap(f_, in_axes=(None, 0))(x, r) ** 2)

    for f_axis, x in ((None, feats), (0, stacked_feats)):
        a = jax.vmap(fn, in_axes=(f_axis, 0))(x, stacked_rois)
        b = jax.vmap(ref_fn, in_axes=(f_axis, 0))(x, stacked_rois)
        np.testing.assert_allclose(a, b, atol=1e-12)
        per_example = jax.vmap(jax.grad(lambda x_, r: jnp.sum(fn(x_, r) ** 2), argnums=(0, 1)), in_axes=(f_axis, 0))
        per_ref = jax.vmap(jax.grad(lambda x_, r: jnp.sum(ref_fn(x_, r) ** 2), argnums=(0, 1)), in_axes=(f_axis, 0))
        for u, v in zip(per_example(x, stacked_rois), per_ref(x, stacked_rois)):
            np.testing.assert_allclose(u, v, atol=1e-10)
    # per-image boxes (vmapped over images inside the public op)
    boxes = jnp.stack([rois[:4, 1:], rois[4:, 1:]])
    per_image = _kernel_op(op, "ffi", size, **kw)(feats, boxes)
    np.testing.assert_allclose(per_image, _kernel_op(op, "xla", size, **kw)(feats, boxes), atol=1e-12)
    # jacrev (reverse, one backward per output row) and jvp (forward mode)
    small = rois[:2]
    np.testing.assert_allclose(jax.jacrev(lambda f: fn(f, small))(feats),
                               jax.jacrev(lambda f: ref_fn(f, small))(feats), atol=1e-12)
    np.testing.assert_allclose(jax.jacrev(lambda r: fn(feats, r))(small),
                               jax.jacrev(lambda r: ref_fn(feats, r))(small), atol=1e-10)
    t_f = jnp.asarray(rng.standard_normal(feats.shape))
    t_r = jnp.asarray(rng.standard_normal(small.shape))
    (o1, j1), (o2, j2) = jax.jvp(fn, (feats, small), (t_f, t_r)), jax.jvp(ref_fn, (feats, small), (t_f, t_r))
    np.testing.assert_allclose(o1, o2, atol=1e-12)
    np.testing.assert_allclose(j1, j2, atol=1e-10)


@needs_kernels
def test_kernels_are_the_default_and_take_deterministic():
    """implementation=None picks the kernels on CPU (as for the other ops); `deterministic`
    is accepted (the CPU kernels are deterministic anyway) and the Flax modules pass it."""
    from jax_roi import linen

    size = (2, 2)
    feats, rois, _ = _inputs(9, size, dtype=np.float32)
    for name, fn in (("ps_roi_align", jax_roi.ps_roi_align), ("ps_roi_pool", jax_roi.ps_roi_pool)):
        text = jax.jit(lambda f, r: fn(f, r, size)).lower(feats, rois).as_text()
        assert f"custom_call @jax_roi_{name}_fwd" in text
        xla_text = jax.jit(lambda f, r: fn(f, r, size, implementation="xla")).lower(feats, rois).as_text()
        assert "custom_call @jax_roi" not in xla_text
        np.testing.assert_array_equal(fn(feats, rois, size, deterministic=True), fn(feats, rois, size))
    module = linen.PSRoIAlign(size, sampling_ratio=2, implementation="ffi", deterministic=True)
    np.testing.assert_allclose(module.apply({}, feats, rois),
                               jax_roi.ps_roi_align(feats, rois, size, sampling_ratio=2, implementation="xla"),
                               atol=1e-5)


@needs_kernels
def test_raw_targets_reject_bad_arguments():
    """The custom calls check their operands and name what is wrong: a channel count that
    is not C_out * oh * ow, a cotangent of the wrong shape, an over-large sampling_ratio."""
    f = jnp.zeros((2, 5, 6, 8), jnp.float32)
    rois = jnp.zeros((3, 5), jnp.float32)
    extra = dict(deterministic=np.int64(0)) if ffi.cuda_emulated() else {}

    def fwd(name, out_shape, **attrs):
        call = jax.ffi.ffi_call(f"jax_roi_{name}_fwd", jax.ShapeDtypeStruct(out_shape, jnp.float32))
        return jax.block_until_ready(call(rois, f, spatial_scale=np.float64(1), **attrs))

    with pytest.raises(Exception, match=r"ps_roi_align forward( \(CUDA\))?: output: expected float32 \[K=3, oh, ow, C_out\] "
                                        r"with C_out \* oh \* ow = C=8 .*got float32 \[3, 2, 2, 3\]"):
        fwd("ps_roi_align", (3, 2, 2, 3), sampling_ratio=np.int64(2))
    with pytest.raises(Exception, match=r"ps_roi_align forward( \(CUDA\))?: sampling_ratio: expected at most 1024 .*got 1025"):
        fwd("ps_roi_align", (3, 2, 2, 2), sampling_ratio=np.int64(1025))
    with pytest.raises(Exception, match=r"ps_roi_pool forward( \(CUDA\))?: spatial_scale: expected a finite number > 0, got"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_ps_roi_pool_fwd", jax.ShapeDtypeStruct((3, 2, 2, 2), jnp.float32))(
            rois, f, spatial_scale=np.float64(-1)))
    with pytest.raises(Exception, match=r"ps_roi_pool backward( \(CUDA\))?: cotangent: expected float32"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_ps_roi_pool_bwd", jax.ShapeDtypeStruct(f.shape, jnp.float32))(
            jnp.zeros((3, 2, 2, 3), jnp.float32), rois, f, spatial_scale=np.float64(1), **extra))
    with pytest.raises(Exception, match=r"ps_roi_pool backward( \(CUDA\))?: d_features: expected float32 \[n\*2, 5, 6, 8\]"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_ps_roi_pool_bwd", jax.ShapeDtypeStruct((3, 5, 6, 8), jnp.float32))(
            jnp.zeros((3, 2, 2, 2), jnp.float32), rois, f, spatial_scale=np.float64(1), **extra))
