"""jax.export: the pure-JAX path serializes, deserializes and runs (forward and gradient), for
CPU and for a multi-platform export (cpu, cuda, tpu); the kernel path either exports or fails
at export time with the project's own error, which names implementation="xla"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_roi
from conftest import IMPLEMENTATIONS

pytest.importorskip("flatbuffers")  # jax.export's serialization needs it (a test extra)

PLATFORMS = [("cpu",), ("cpu", "cuda", "tpu")]


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 10, 3)), jnp.float32)
    rois = jnp.asarray([[0, 1, 1, 6, 5], [1, 0.5, 2, 9, 7], [0, -2, 3, 4, 12], [-1, 1, 1, 2, 2]], jnp.float32)
    levels = [x, x[:, ::2, ::2]]
    return x, rois, levels


OPS = {
    "roi_align": lambda impl: lambda x, r, lv: jax_roi.roi_align(x, r, 3, spatial_scale=0.5, sampling_ratio=-1,
                                                                 implementation=impl),
    "roi_align_max": lambda impl: lambda x, r, lv: jax_roi.roi_align(x, r, (2, 3), spatial_scale=0.5,
                                                                     sampling_ratio=2, reduction="max",
                                                                     implementation=impl),
    "roi_warp": lambda impl: lambda x, r, lv: jax_roi.roi_warp(x, r, 2, spatial_scale=0.5, implementation=impl),
    "roi_pool": lambda impl: lambda x, r, lv: jax_roi.roi_pool(x, r, 2, spatial_scale=0.5, implementation=impl),
    "multiscale": lambda impl: lambda x, r, lv: jax_roi.multiscale_roi_align(
        lv, r, 2, spatial_scales=[0.5, 0.25], canonical_scale=4, canonical_level=2, sampling_ratio=2,
        implementation=impl),
}


def _roundtrip(fn, platforms, *args):
    exp = export.export(jax.jit(fn), platforms=platforms)(*args)
    blob = exp.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 100
    again = export.deserialize(blob)
    assert again.platforms == tuple(platforms)
    return again


# The quick subset (-m "not slow") exports these; every other (op, platforms) pair is slow.
QUICK = {("roi_align", "multi"), ("roi_pool", "cpu")}
CASES = [pytest.param(op, platforms, id=f"{op}-{name}",
                      marks=[] if (op, name) in QUICK else [pytest.mark.slow])
         for op in OPS for platforms, name in zip(PLATFORMS, ["cpu", "multi"])]


@pytest.mark.parametrize("op, platforms", CASES)
def test_xla_path_exports_forward_and_gradient(op, platforms):
    x, rois, levels = _inputs()
    f = OPS[op]("xla")

    def loss(x, r, lv):
        return jnp.sum(f(x, r, lv) ** 2)

    fwd = _roundtrip(f, platforms, x, rois, levels)
    np.testing.assert_allclose(fwd.call(x, rois, levels), f(x, rois, levels), rtol=1e-6, atol=1e-6)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    exported_grad = _roundtrip(grad, platforms, x, rois, levels)
    for got, want in zip(jax.tree.leaves(exported_grad.call(x, rois, levels)),
                         jax.tree.leaves(grad(x, rois, levels))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_xla_path_exported_with_its_vjp():
    """serialize(vjp_order=1): a caller differentiates the deserialized forward."""
    x, rois, levels = _inputs()
    f = OPS["roi_align"]("xla")
    exp = export.export(jax.jit(f), platforms=("cpu", "cuda", "tpu"))(x, rois, levels)
    again = export.deserialize(exp.serialize(vjp_order=1))
    got = jax.grad(lambda x, r: jnp.sum(again.call(x, r, levels) ** 2), argnums=(0, 1))(x, rois)
    want = jax.grad(lambda x, r: jnp.sum(f(x, r, levels) ** 2), argnums=(0, 1))(x, rois)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_xla_path_exports_with_symbolic_batch():
    """A shape-polymorphic export: the number of rois is a symbol."""
    x, rois, levels = _inputs()
    f = OPS["roi_align"]("xla")
    k, = export.symbolic_shape("k")
    try:
        exp = export.export(jax.jit(lambda x, r: f(x, r, levels)))(
            x, jax.ShapeDtypeStruct((k, 5), rois.dtype))
    except Exception as err:  # some ops need a static K; that is allowed, but must be said clearly
        pytest.skip(f"shape-polymorphic K not supported: {type(err).__name__}: {str(err)[:200]}")
    again = export.deserialize(exp.serialize())
    for n in (1, 4):
        np.testing.assert_allclose(again.call(x, rois[:n]), f(x, rois[:n], levels), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("ffi" not in IMPLEMENTATIONS, reason="the kernels are not built for this platform")
@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "multiscale"])
def test_ffi_path_exports_or_names_the_xla_path(op):
    x, rois, levels = _inputs()
    f = OPS[op]("ffi")
    for fn in (f, jax.grad(lambda x, r, lv: jnp.sum(f(x, r, lv)))):
        try:
            again = _roundtrip(fn, ("cpu",), x, rois, levels)
        except Exception as err:  # noqa: BLE001 -- the message is what is checked
            msg = str(err)
            if 'implementation="xla"' not in msg and "Cannot serialize code with custom calls" in msg:
                # jax's generic refusal: what the kernel path gives until the glue raises its own error
                pytest.xfail("the kernel path does not yet raise its own export error")
            assert 'implementation="xla"' in msg, msg
        else:
            jax.block_until_ready(again.call(x, rois, levels))
