"""The FFI kernel path under transformations: vmap folds into ONE custom call (rois into the
box axis, features into the image axis), grad adds ONE backward call, the shared feature
map is never broadcast; jit, checkpoint and scan compose; loading and registering the
targets is idempotent and thread-safe."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_rois

from jax_roi import ffi
from jax_roi import xla as X

pytestmark = pytest.mark.skipif("cpu" not in ffi.platforms(), reason="the FFI CPU kernels are not built")

if "cpu" in ffi.platforms():
    from jax_roi.ffi import _loader
    from jax_roi.ffi import ops as F

N, B, H, W, C, K = 3, 2, 11, 13, 4, 9
KW = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True)


def _data(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((N, B, H, W, C)), dtype)
    rois = np.stack([random_rois(rng, B, H, W, K, scale=0.5, edge=False) for _ in range(N)])
    rois[:, 0, 0] = -1  # a padding row in every element
    rois[:, 1, 0] = B  # and one past the batch
    rois[1, 2, 1] = np.nan
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return feats, jnp.asarray(rois.astype(coord)), rng


MODES = {"both": (0, 0), "features": (0, None), "rois": (None, 0)}


def _args(mode, feats, rois):
    fa, ra = MODES[mode]
    return (feats if fa == 0 else feats[0]), (rois if ra == 0 else rois[0]), (fa, ra)


def _align(impl, **extra):
    return lambda f, r: impl.roi_align(f, r, (3, 2), **KW, **extra)


def _pool(impl):
    return lambda f, r: impl.roi_pool(f, r, (3, 2), spatial_scale=0.5, binning="caffe")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", ["avg", "max", "warp", "pool"])
def test_vmap_values_and_gradients_match_xla(mode, op):
    feats, rois, rng = _data(1)
    f, r, axes = _args(mode, feats, rois)
    if op == "pool":
        fk, fx = _pool(F), _pool(X)
    else:
        extra = dict(reduction="max") if op == "max" else dict(quantize=True) if op == "warp" else {}
        fk, fx = _align(F, **extra), _align(X, **extra)
    vk, vx = jax.vmap(fk, in_axes=axes), jax.vmap(fx, in_axes=axes)
    out = vk(f, r)
    assert out.shape == (N, K, 3, 2, C)
    np.testing.assert_allclose(out, vx(f, r), atol=1e-12, rtol=1e-12)
    cot = jnp.asarray(rng.standard_normal(out.shape))

    def loss(v):
        return lambda f, r: jnp.sum(v(f, r) * cot)

    gk = jax.grad(loss(vk), argnums=(0, 1))(f, r)
    gx = jax.grad(loss(vx), argnums=(0, 1))(f, r)
    for a, b in zip(gk, gx):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)
    # per-example gradients: vmap of grad (the backward call batched, shared maps included)
    pk = jax.vmap(jax.grad(lambda f, r: jnp.sum(fk(f, r) ** 2), argnums=(0, 1)), in_axes=axes)(f, r)
    px = jax.vmap(jax.grad(lambda f, r: jnp.sum(fx(f, r) ** 2), argnums=(0, 1)), in_axes=axes)(f, r)
    for a, b in zip(pk, px):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)


def test_nested_vmap_and_multilevel_vmap():
    feats, rois, _ = _data(2)
    f2 = jnp.stack([feats, feats * 2])  # [2, N, B, H, W, C]
    r2 = jnp.stack([rois, rois[::-1]])
    k = jax.vmap(jax.vmap(_align(F)))(f2, r2)
    x = jax.vmap(jax.vmap(_align(X)))(f2, r2)
    np.testing.assert_allclose(k, x, atol=1e-12, rtol=1e-12)
    levels = (feats, feats[:, :, ::2, ::2])
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 2, (N, K)), jnp.int32)
    kw = dict(spatial_scales=[0.5, 0.25], sampling_ratio=-1, aligned=True)
    mk = jax.vmap(lambda ls, r, i: F.multilevel_roi_align(ls, r, i, (2, 2), **kw))(levels, rois, ids)
    mx = jax.vmap(lambda ls, r, i: X.multilevel_roi_align(ls, r, i, (2, 2), **kw))(levels, rois, ids)
    np.testing.assert_allclose(mk, mx, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- HLO


def _count(text, target):
    return text.count(f"custom_call @{target}") + text.count(f'custom_call_target="{target}"')


def _compiled(fn, *args):
    """The compiled HLO: a per-image call is wrapped for the partitioner, and only
    compilation shows the custom call inside."""
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("mode", list(MODES))
def test_vmap_lowers_to_one_call_each_way(mode):
    feats, rois, _ = _data(4, np.float32)
    f, r, axes = _args(mode, feats, rois)
    v = jax.vmap(_align(F), in_axes=axes)
    text = _compiled(v, f, r)
    assert _count(text, "jax_roi_roi_align_fwd") == 1
    assert "jax_roi_roi_align_bwd" not in text
    text = _compiled(jax.grad(lambda f, r: jnp.sum(jnp.sin(v(f, r))), argnums=(0, 1)), f, r)
    assert _count(text, "jax_roi_roi_align_fwd") == 1
    assert _count(text, "jax_roi_roi_align_bwd") == 1
    vp = jax.vmap(_pool(F), in_axes=axes)
    text = _compiled(jax.grad(lambda f, r: jnp.sum(jnp.sin(vp(f, r)))), f, r)
    assert _count(text, "jax_roi_roi_pool_fwd") == 1 and _count(text, "jax_roi_roi_pool_bwd") == 1


def test_vmap_over_rois_does_not_broadcast_the_feature_map():
    feats, rois, _ = _data(5, np.float32)
    f = feats[0]
    text = jax.jit(jax.vmap(_align(F), in_axes=(None, 0))).lower(f, rois).as_text()
    mapped_shape = f"tensor<{N}x{B}x{H}x{W}x{C}xf32>"
    folded_shape = f"tensor<{N * B}x{H}x{W}x{C}xf32>"
    assert mapped_shape not in text and folded_shape not in text
    # the custom call reads the original [B, H, W, C] map and all N*K rois at once
    call = [line for line in text.splitlines() if "custom_call @jax_roi_roi_align_fwd" in line][0]
    assert f"tensor<{B}x{H}x{W}x{C}xf32>" in call and f"tensor<{N * K}x5xf32>" in call
    # under grad the backward call reads the shared map too (d_features get N*B images)
    text = jax.jit(jax.grad(lambda f, r: jnp.sum(jnp.sin(jax.vmap(_align(F), in_axes=(None, 0))(f, r))))).lower(
        f, rois).as_text()
    assert mapped_shape not in text.split("custom_call @jax_roi_roi_align_bwd")[0].split("\n")[-1]
    call = [line for line in text.splitlines() if "custom_call @jax_roi_roi_align_bwd" in line][0]
    assert f"tensor<{B}x{H}x{W}x{C}xf32>" in call.split("->")[0]


def test_box_gradient_only_when_rois_are_differentiated():
    feats, rois, _ = _data(6, np.float32)
    f, r = feats[0], rois[0]
    only_features = jax.jit(jax.grad(lambda f: jnp.sum(jnp.sin(_align(F)(f, r))))).lower(f).as_text()
    both = jax.jit(jax.grad(lambda f, r: jnp.sum(jnp.sin(_align(F)(f, r))), argnums=(0, 1))).lower(f, r).as_text()
    assert "rois_grad = 0" in only_features and "rois_grad = 1" in both


# ----------------------------------------------------------------------------- composition


def test_jit_checkpoint_scan_compose():
    feats, rois, _ = _data(7)
    f, r = feats[0], rois[0]

    def body(carry, rr):
        out = jax.checkpoint(_align(F))(f * carry, rr)
        return carry + 0.1 * jnp.mean(out), jnp.sum(out ** 2)

    def loss(f_scale, rs):
        c, ys = jax.lax.scan(body, f_scale, rs)
        return c + jnp.sum(ys)

    def loss_x(f_scale, rs):
        def body_x(carry, rr):
            out = _align(X)(f * carry, rr)
            return carry + 0.1 * jnp.mean(out), jnp.sum(out ** 2)

        c, ys = jax.lax.scan(body_x, f_scale, rs)
        return c + jnp.sum(ys)

    v, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(1.0, rois)
    vx, gx = jax.value_and_grad(loss_x, argnums=(0, 1))(1.0, rois)
    np.testing.assert_allclose(v, vx, rtol=1e-12)
    np.testing.assert_allclose(g[0], gx[0], rtol=1e-10)
    np.testing.assert_allclose(g[1], gx[1], atol=1e-9, rtol=1e-9)
    # pool under scan + remat
    pl = jax.jit(jax.grad(lambda f: jax.lax.scan(lambda c, rr: (c + jnp.sum(jax.checkpoint(_pool(F))(f, rr)), None),
                                                 0.0, rois)[0]))(f)
    px = jax.grad(lambda f: jax.lax.scan(lambda c, rr: (c + jnp.sum(_pool(X)(f, rr)), None), 0.0, rois)[0])(f)
    np.testing.assert_allclose(pl, px, atol=1e-12)


def test_lowering_for_other_platforms_uses_the_pure_jax_path():
    feats, rois, _ = _data(8, np.float32)
    f, r = feats[0], rois[0]
    text = jax.jit(_align(F)).trace(f, r).lower(lowering_platforms=("tpu",)).as_text()
    assert "jax_roi_roi_align" not in text


# ----------------------------------------------------------------------------- loading


def test_loading_and_registering_twice_is_harmless():
    assert ffi.platforms() == _loader.platforms()
    assert "cpu" in _loader.load()[0]
    ext = _loader._state["ext"]
    # The "cpu" targets in effect (the emulated CUDA ones under JAX_ROI_EMULATE_CUDA=1).
    registered = ext.emulated_cuda_targets() if _loader.cuda_emulated() else ext.cpu_targets()
    for name, capsule in registered.items():  # the same pointer again: accepted
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    saved = dict(_loader._state)
    try:
        _loader._state.clear()  # force a fresh registration, from many threads at once
        results = []
        threads = [threading.Thread(target=lambda: results.append(_loader.load())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 8 and all("cpu" in p for p, _ in results)
    finally:
        _loader._state.update(saved)
    feats, rois, _ = _data(9, np.float32)
    np.testing.assert_allclose(_align(F)(feats[0], rois[0]), _align(X)(feats[0], rois[0]), atol=1e-5)
