"""roi_pool on every built implementation: the worked example of docs/semantics.md, the float64
oracle over both binnings and the edge boxes, gradients, dtypes, torchvision golden data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEAD_ROWS, TOLERANCE, output_and_feature_gradient, random_rois

import jax_roi
import reference as R


@pytest.mark.parametrize("binning, box, expected", [
    ("floor", (0, 3, 7, 8), [[0.85, 0.84], [0.97, 0.96]]),
    ("caffe", (0, 3, 6, 7), [[0.85, 0.96], [0.97, 0.96]]),
])
def test_worked_example(implementation, binning, box, expected):
    feats = jnp.asarray(R.POOL_EXAMPLE_MAP, jnp.float32)[None, :, :, None]
    out = jax_roi.roi_pool(feats, jnp.asarray([[0, *box]], jnp.float32), 2, binning=binning,
                           implementation=implementation)
    np.testing.assert_allclose(out[0, :, :, 0], expected, atol=1e-7)


@pytest.mark.parametrize("binning", ["caffe", "floor"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_matches_reference_with_gradients(implementation, binning, scale):
    rng = np.random.default_rng(11)
    feats = jnp.asarray(rng.standard_normal((2, 9, 12, 3)))
    rois = random_rois(rng, 2, 9, 12, 20, scale=scale)
    out = jax_roi.roi_pool(feats, jnp.asarray(rois), (3, 2), spatial_scale=scale, binning=binning,
                           implementation=implementation)
    ref = R.roi_pool_ref(np.asarray(feats), rois, (3, 2), spatial_scale=scale, binning=binning)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    cot = rng.standard_normal(out.shape)

    def loss(f, r):
        return jnp.sum(jax_roi.roi_pool(f, r, (3, 2), spatial_scale=scale, binning=binning,
                                        implementation=implementation) * cot)

    d_f, d_r = jax.grad(loss, argnums=(0, 1))(feats, jnp.asarray(rois))
    ref_f, _ = R.roi_pool_ref_vjp(np.asarray(feats), rois, (3, 2), cot, spatial_scale=scale, binning=binning)
    np.testing.assert_allclose(np.asarray(d_f), ref_f, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(d_r), 0)  # quantized: no box gradient


def test_channels_beyond_one_search_chunk(implementation):
    # The pure-JAX search runs over chunks of 32 channels, the last one padded: 70 channels
    # take three chunks, the last of 6. Ties are seeded too (rounded values), so the first
    # maximal cell must be found in every chunk.
    rng = np.random.default_rng(15)
    feats = np.round(rng.standard_normal((2, 9, 12, 70)), 1)
    rois = random_rois(rng, 2, 9, 12, 12)
    cot = rng.standard_normal((rois.shape[0], 3, 3, 70))
    out, d_f = jax.jit(jax.value_and_grad(
        lambda f: jnp.sum(jax_roi.roi_pool(f, jnp.asarray(rois), 3, implementation=implementation) * cot)))(
        jnp.asarray(feats))
    ref_out = R.roi_pool_ref(feats, rois, (3, 3))
    ref_f, _ = R.roi_pool_ref_vjp(feats, rois, (3, 3), cot)
    np.testing.assert_allclose(float(out), np.sum(ref_out * cot), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(d_f), ref_f, atol=1e-12)


def test_gradient_goes_to_first_maximum(implementation):
    feats = jnp.ones((1, 4, 4, 1))
    g = jax.grad(lambda f: jnp.sum(jax_roi.roi_pool(f, jnp.array([[0, 0, 0, 3, 3.0]]), 1,
                                                    implementation=implementation)))(feats)
    expected = np.zeros((1, 4, 4, 1))
    expected[0, 0, 0, 0] = 1
    np.testing.assert_array_equal(np.asarray(g), expected)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.float64], ids=["f32", "bf16", "f16", "f64"])
def test_dtypes(implementation, dtype):
    rng = np.random.default_rng(12)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 4)), dtype)
    rois = random_rois(rng, 2, 7, 9, 10)
    out = jax_roi.roi_pool(feats, jnp.asarray(rois), 3, implementation=implementation)
    assert out.dtype == jnp.dtype(dtype)
    ref = R.roi_pool_ref(np.asarray(feats.astype(jnp.float64)), rois, 3,
                         coord_dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float64)), ref, atol=atol, rtol=rtol)


def test_torchvision_golden(implementation, golden_data):
    g = golden_data
    feats = jnp.asarray(g["align_features_nhwc"], jnp.float32)
    rois = jnp.asarray(g["pool_rois"])
    for i, tag in enumerate(str(t) for t in g["pool_tags"]):
        s, oh, ow = g["pool_params"][i]
        kw = dict(spatial_scale=float(s), implementation=implementation)
        cot = jnp.asarray(g[f"{tag}_cot_nhwc"])
        out, d_f = output_and_feature_gradient(
            lambda f: jax_roi.roi_pool(f, rois, (int(oh), int(ow)), **kw), feats, cot)
        np.testing.assert_allclose(np.asarray(out), g[f"{tag}_out_nhwc"], atol=1e-5, rtol=0, err_msg=tag)
        np.testing.assert_allclose(np.asarray(d_f), g[f"{tag}_dfeat_nhwc"], atol=1e-5, rtol=0, err_msg=tag)


def test_per_image_form_rounds_bins_exactly(implementation):
    """A 7-cell box in 3 bins: ceil(3 * (7/3)) must be 7 in float32 (XLA turns a division by
    a broadcast constant into a reciprocal multiply, 7.0000005, unless told not to), in the
    per-image form (vmapped over images) as in the rois form."""
    rng = np.random.default_rng(13)
    feats = jnp.asarray(rng.standard_normal((2, 16, 20, 2)), jnp.float32)
    boxes = jnp.asarray([[[5.3, 3.41, 9.45, 9.29]], [[13.5, 3.41, 26.8, 9.29]]], jnp.float32)
    rois = jnp.concatenate([jnp.array([[0.0], [1.0]]), boxes.reshape(2, 4)], axis=1)
    per_image = jax_roi.roi_pool(feats, boxes, 3, implementation=implementation).reshape(2, 3, 3, 2)
    flat = jax_roi.roi_pool(feats, rois, 3, implementation=implementation)
    ref = R.roi_pool_ref(np.asarray(feats), np.asarray(rois), 3, coord_dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(per_image), np.asarray(flat))
    np.testing.assert_allclose(np.asarray(flat), ref, atol=1e-7)


@pytest.mark.parametrize("output_size, big", [(1, True), (2, True), ((3, 2), True), ((3, 3), False), (4, False)])
def test_ties_gradient_to_first_maximum_row_major(implementation, output_size, big):
    """Few distinct values (many equal maxima per bin, across rows and columns) and bins
    from one cell to larger than the table blocks: values and the gradient (to the first
    maximal cell in row-major order) match the oracle."""
    rng = np.random.default_rng(21)
    feats = jnp.asarray(rng.integers(0, 3, (2, 21, 19, 3)).astype(np.float64))
    rois = random_rois(rng, 2, 21, 19, 24)
    if big:  # bins of 8 cells and more
        rois = np.concatenate([rois, [[0, 0, 0, 18, 20], [1, 2, 1, 17, 19], [1, -5, -5, 40, 40]]])
    out = jax_roi.roi_pool(feats, jnp.asarray(rois), output_size, implementation=implementation)
    ref = R.roi_pool_ref(np.asarray(feats), rois, output_size)
    np.testing.assert_array_equal(np.asarray(out), ref)
    cot = rng.standard_normal(out.shape)
    d_f = jax.grad(lambda f: jnp.sum(jax_roi.roi_pool(f, jnp.asarray(rois), output_size,
                                                      implementation=implementation) * cot))(feats)
    ref_f, _ = R.roi_pool_ref_vjp(np.asarray(feats), rois, output_size, cot)
    np.testing.assert_allclose(np.asarray(d_f), ref_f, atol=1e-12)


def test_pure_jax_path_lowers_for_tpu():
    """Forward, reverse and forward-mode derivatives of the pure-JAX path lower for TPU."""
    feats = jnp.zeros((1, 20, 24, 2), jnp.float32)
    rois = jnp.array([[0, 0, 0, 23, 19], [0, 2, 3, 9, 8]], jnp.float32)
    fn = lambda f: jax_roi.roi_pool(f, rois, 2, implementation="xla")  # noqa: E731
    for g in (fn, jax.grad(lambda f: jnp.sum(fn(f))), lambda f: jax.jvp(fn, (f,), (f,))[1]):
        jax.jit(g).trace(feats).lower(lowering_platforms=("tpu",)).as_text()


def test_every_bin_shape_on_tied_values(implementation):
    """One box at a time, so that each call's largest bin picks its own table (pure JAX:
    the fewest block levels per axis that the bin's sides need, the two axes apart or not,
    or the looped blocks beyond the table): bins of 1 to 17 cells a side on a map of few
    distinct values, values and the gradient against the oracle."""
    rng = np.random.default_rng(23)
    feats = jnp.asarray(rng.integers(0, 3, (1, 20, 20, 2)).astype(np.float64))
    sides = [1, 2, 3, 4, 5, 8, 9, 17]

    @jax.jit
    def pool_and_grad(f, r, cot):
        out, vjp = jax.vjp(lambda f: jax_roi.roi_pool(f, r, 1, implementation=implementation), f)
        return out, vjp(cot)[0]

    for h in sides:
        for w in sides:
            y, x = rng.integers(0, 21 - h), rng.integers(0, 21 - w)
            rois = np.array([[0, x, y, x + w - 1, y + h - 1]], np.float64)
            cot = rng.standard_normal((1, 1, 1, 2))
            out, d_f = pool_and_grad(feats, jnp.asarray(rois), jnp.asarray(cot))
            ref = R.roi_pool_ref(np.asarray(feats), rois, 1)
            ref_f, _ = R.roi_pool_ref_vjp(np.asarray(feats), rois, 1, cot)
            np.testing.assert_array_equal(np.asarray(out), ref, err_msg=f"bin {h}x{w}")
            np.testing.assert_allclose(np.asarray(d_f), ref_f, atol=1e-12, err_msg=f"bin {h}x{w}")
