"""Every JAX transform on every path: the transform matrix.

For each op (roi_align avg/max with fixed and adaptive sampling, roi_warp, roi_pool,
multiscale_roi_align, ps_roi_align, ps_roi_pool, roi_align_rotated), each box form
(``[K, 5]`` rois and per-image ``[B, R, 4]`` boxes; ``[K, 6]`` and ``[B, R, 5]`` rotated) and
each implementation the op has, every transform below is applied:

* ``implementation="ffi"`` and ``None``: the result must equal the pure-JAX path's result
  of the same transform, to float64 rounding;
* ``implementation="xla"`` (the reference): the transform must agree with an identity that
  does not use it (``jvp`` against ``vjp``, ``jacfwd`` against ``jacrev``, ``vmap`` against
  a Python loop, the Hessian against finite differences of the gradient, ...).

On the kernel path, the lowered HLO must hold one forward custom call (and, for reverse
mode, one backward call) under any ``vmap``: mapped axes fold into the box or image axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_roi
from conftest import ROTATED_IMPLEMENTATIONS
from jax_roi import ffi
from jax_roi.ffi import targets

KERNELS = jax.default_backend() in ffi.platforms()
B, H, W, C, R = 2, 5, 6, 2, 3
SIZE = (2, 2)
SCALES = [0.5, 0.25]
PS_CHANNELS = 2 * SIZE[0] * SIZE[1]  # two output channels, each bin reading its own group

OPS = {
    "align-avg-fixed": lambda f, b, impl: jax_roi.roi_align(f, b, SIZE, spatial_scale=0.5, sampling_ratio=2,
                                                            implementation=impl),
    "align-avg-adaptive": lambda f, b, impl: jax_roi.roi_align(f, b, SIZE, spatial_scale=0.5, sampling_ratio=-1,
                                                               aligned=False, implementation=impl),
    "align-max-fixed": lambda f, b, impl: jax_roi.roi_align(f, b, SIZE, spatial_scale=0.5, sampling_ratio=2,
                                                            reduction="max", implementation=impl),
    "align-max-adaptive": lambda f, b, impl: jax_roi.roi_align(f, b, SIZE, spatial_scale=0.5, sampling_ratio=0,
                                                               reduction="max", implementation=impl),
    "warp": lambda f, b, impl: jax_roi.roi_warp(f, b, SIZE, spatial_scale=0.5, sampling_ratio=2,
                                                implementation=impl),
    "pool": lambda f, b, impl: jax_roi.roi_pool(f, b, SIZE, spatial_scale=0.5, implementation=impl),
    "multiscale": lambda f, b, impl: jax_roi.multiscale_roi_align(f, b, SIZE, spatial_scales=SCALES,
                                                                  sampling_ratio=2, canonical_scale=8,
                                                                  canonical_level=1, implementation=impl),
    "ps-align": lambda f, b, impl: jax_roi.ps_roi_align(f, b, SIZE, spatial_scale=0.5, sampling_ratio=2,
                                                        implementation=impl),
    "ps-pool": lambda f, b, impl: jax_roi.ps_roi_pool(f, b, SIZE, spatial_scale=0.5, implementation=impl),
    # Fixed sampling: the adaptive form's reverse mode compiles a loop per sample window
    # (tests/test_rotated.py runs it under vmap and forward mode).
    "rotated": lambda f, b, impl: jax_roi.roi_align_rotated(f, b, SIZE, spatial_scale=0.5, sampling_ratio=2,
                                                            implementation=impl),
}
# The kind of kernel (jax_roi.ffi.targets) each op calls; RoIAlign's for the rest.
KERNEL_KIND = {"pool": "pool", "ps-align": "ps_align", "ps-pool": "ps_pool", "rotated": "rotated"}
# RoIWarp's rounded and the RoIPools' whole cells are flat in the boxes: a Jacobian in the
# boxes alone is zero and calls no kernel.
FLAT_IN_BOXES = {"warp", "pool", "ps-pool"}
ROTATED_OPS = {"rotated"}


def _boxes(rng, n):
    """``[n, 4]`` boxes in image pixels, away from the sampling grid's kinks (the
    finite-difference checks need the function smooth around them)."""
    x1 = rng.uniform(0.3, 7.0, n)
    y1 = rng.uniform(0.3, 5.0, n)
    return np.stack([x1, y1, x1 + rng.uniform(2.1, 6.3, n), y1 + rng.uniform(2.1, 5.2, n)], axis=1)


def _rotated_boxes(rng, n):
    """``[n, 5]`` oriented boxes ``(x_ctr, y_ctr, w, h, angle)``: the boxes above about
    their centres, turned by seeded angles in [-180, 180) degrees."""
    x1, y1, x2, y2 = _boxes(rng, n).T
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, rng.uniform(-180, 180, n)], axis=1)


@functools.lru_cache(maxsize=None)
def _inputs(op, form):
    rng = np.random.default_rng(7)
    channels = PS_CHANNELS if op.startswith("ps-") else C
    if op == "multiscale":
        feats = [jnp.asarray(rng.standard_normal((B, H, W, C))),
                 jnp.asarray(rng.standard_normal((B, (H + 1) // 2, (W + 1) // 2, C)))]
    else:
        feats = jnp.asarray(rng.standard_normal((B, H, W, channels)))
    boxes = _rotated_boxes(rng, B * R) if op in ROTATED_OPS else _boxes(rng, B * R)
    if form == "rois":
        boxes = np.concatenate([np.repeat(np.arange(B), R)[:, None], boxes], axis=1)
        boxes[1, 0] = -1  # a padding row: zeros and no gradient on every path
    else:
        boxes = boxes.reshape(B, R, boxes.shape[-1])
    return feats, jnp.asarray(boxes)


def _is_rois(a):
    """Whether ``a`` is a rois array (or a stack of them), whose first column is the batch
    index: ``[K = B * R, 5 or 6]``, where per-image boxes have ``R`` rows and feature maps
    ``C`` or ``PS_CHANNELS`` channels last."""
    return a.ndim >= 2 and a.shape[-2] == B * R and a.shape[-1] in (5, 6)


def _stack(x, n=2, seed=3):
    """``n`` different copies of ``x`` along a new leading axis (for vmap); a rois
    array keeps its batch indices."""
    rng = np.random.default_rng(seed)

    def noise(a):
        d = 0.25 * rng.standard_normal(a.shape)
        if _is_rois(a):
            d[..., 0] = 0
        return d

    return jax.tree.map(lambda a: jnp.stack([a] + [a + noise(a) for _ in range(n - 1)]), x)


def _with_tangent(x, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), x)


def _box_tangent(boxes, seed):
    t = _with_tangent(boxes, seed)
    return t.at[..., 0].set(0) if _is_rois(boxes) else t  # batch indices are not differentiable


def _loss(fn):
    """A scalar with a non-trivial Hessian in both arguments."""
    def loss(f, b):
        out = fn(f, b)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))) + 0.5 * jnp.sum(out ** 2)
    return loss


# Each transform: (fn, features, boxes) -> pytree. `fn(f, b)` is the op.
def _vmap_boxes(fn, f, b):
    return jax.vmap(fn, in_axes=(None, 0))(f, _stack(b))


TRANSFORMS = {
    "jit": lambda fn, f, b: jax.jit(fn)(f, b),
    "grad": lambda fn, f, b: jax.grad(_loss(fn), argnums=(0, 1))(f, b),
    "vjp": lambda fn, f, b: jax.vjp(fn, f, b)[1](_with_tangent(fn(f, b), 11)),
    "jacrev": lambda fn, f, b: jax.jacrev(fn, argnums=(0, 1))(f, b),
    "jvp": lambda fn, f, b: jax.jvp(fn, (f, b), (_with_tangent(f, 12), _box_tangent(b, 13))),
    "jacfwd": lambda fn, f, b: jax.jacfwd(fn, argnums=(0, 1))(f, b),
    "hessian": lambda fn, f, b: jax.hessian(_loss(fn), argnums=(0, 1))(f, b),
    "vmap-features": lambda fn, f, b: jax.vmap(fn, in_axes=(0, None))(_stack(f), b),
    "vmap-boxes": _vmap_boxes,
    "vmap-both": lambda fn, f, b: jax.vmap(fn)(_stack(f), _stack(b)),
    "vmap-nested": lambda fn, f, b: jax.vmap(jax.vmap(fn, in_axes=(0, None)), in_axes=(None, 0))(
        _stack(f), _stack(b, seed=4)),
    "vmap-of-grad": lambda fn, f, b: jax.vmap(jax.grad(_loss(fn), argnums=(0, 1)))(_stack(f), _stack(b)),
    "vmap-of-grad-shared": lambda fn, f, b: jax.vmap(jax.grad(_loss(fn), argnums=(0, 1)), in_axes=(None, 0))(
        f, _stack(b)),
    "grad-of-vmap": lambda fn, f, b: jax.grad(lambda f, b: jnp.sum(jax.vmap(_loss(fn), in_axes=(0, None))(f, b)),
                                              argnums=(0, 1))(_stack(f), b),
    "vmap-of-jvp": lambda fn, f, b: jax.vmap(lambda f, b: jax.jvp(fn, (f, b), (_with_tangent(f, 14),
                                                                                 _box_tangent(b, 15))))(
        _stack(f), _stack(b)),
    "jvp-of-vmap": lambda fn, f, b: jax.jvp(jax.vmap(fn, in_axes=(None, 0)), (f, _stack(b)),
                                            (_with_tangent(f, 16), _box_tangent(_stack(b), 17))),
    "vmap-of-jacrev": lambda fn, f, b: jax.vmap(jax.jacrev(fn, argnums=1), in_axes=(None, 0))(f, _stack(b)),
    "vmap-of-hessian": lambda fn, f, b: jax.vmap(jax.hessian(_loss(fn), argnums=1), in_axes=(None, 0))(f, _stack(b)),
    "checkpoint": lambda fn, f, b: jax.grad(jax.checkpoint(_loss(fn)), argnums=(0, 1))(f, b),
    "scan": lambda fn, f, b: jax.grad(lambda f, b: lax.scan(lambda c, s: (c + s * _loss(fn)(f, b), None), 0.0,
                                                            jnp.arange(1.0, 3.0))[0], argnums=(0, 1))(f, b),
    "cond": lambda fn, f, b: jax.grad(lambda f, b: lax.cond(jnp.sum(b) > 0, _loss(fn), lambda f, b: 0.0 * jnp.sum(b),
                                                            f, b), argnums=(0, 1))(f, b),
}
REVERSE = {"grad", "vjp", "jacrev", "vmap-of-grad", "vmap-of-grad-shared", "grad-of-vmap", "checkpoint", "vmap-of-jacrev"}
VMAPPED_FORWARD = {"vmap-features", "vmap-boxes", "vmap-both", "vmap-nested"}


def _close(a, b, tol=1e-9):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@functools.lru_cache(maxsize=None)
def _reference(op, form, transform):
    feats, boxes = _inputs(op, form)
    return _apply(transform, op, "xla", feats, boxes)


def _apply(transform, op, impl, feats, boxes):
    """The transform of the op, jit-compiled as a whole (one compile, not op by op)."""
    fn = functools.partial(lambda f, b, op, impl: OPS[op](f, b, impl), op=op, impl=impl)
    return jax.jit(lambda f, b: TRANSFORMS[transform](fn, f, b))(feats, boxes)


def _count(text, target):
    return text.count(f'custom_call_target="{target}"') + text.count(f"custom_call @{target}(")


# The quick subset (`pytest -m "not slow"`) keeps every op and every transform, each at
# least once. The whole suite runs every op under every transform with per-image boxes
# (which go through the grouped primitives and their folding) and, with rois, every
# transform on adaptive average RoIAlign and on the others the transforms whose rules
# differ by box form (the batching of a mapped rois axis, reverse and forward mode).
# Fixed and adaptive sampling share every primitive and rule (only the kernels' sample
# count differs), so the whole matrix runs one of each pair and the other in the quick rows.
CORE = {"jit", "grad", "jvp", "hessian", "vmap-both", "vmap-of-grad", "grad-of-vmap"}
ROIS_FORM = CORE | {"vmap-boxes", "vmap-of-grad-shared", "vmap-of-jacrev", "jvp-of-vmap"}
QUICK_ONLY_OPS = {"align-avg-fixed", "align-max-adaptive"}


def _matrix():
    for op in OPS:
        for form in ("rois", "per_image"):
            for transform in TRANSFORMS:
                quick = (transform in CORE and form == "per_image") or (form == "rois"
                                                                        and op == "align-avg-adaptive")
                if not quick and (op in QUICK_ONLY_OPS or (form == "rois" and transform not in ROIS_FORM)):
                    continue
                marks = () if quick else (pytest.mark.slow,)
                yield pytest.param(op, form, transform, marks=marks, id=f"{op}-{form}-{transform}")


@pytest.mark.parametrize("op, form, transform", list(_matrix()))
def test_kernel_path_matches_pure_jax(op, form, transform):
    """``implementation="ffi"``: each transform equals the pure-JAX path's, and under any
    vmap lowers to one forward custom call (reverse mode: plus one backward call)."""
    if not KERNELS:
        pytest.skip("the kernels are not built for this platform")
    if op in ROTATED_OPS and "ffi" not in ROTATED_IMPLEMENTATIONS:
        pytest.skip("roi_align_rotated has no kernels in this build")
    feats, boxes = _inputs(op, form)
    fn = functools.partial(lambda f, b, op: OPS[op](f, b, "ffi"), op=op)
    compiled = jax.jit(lambda f, b: TRANSFORMS[transform](fn, f, b)).lower(feats, boxes).compile()
    _close(compiled(feats, boxes), _reference(op, form, transform))
    text = compiled.as_text()
    kind = KERNEL_KIND.get(op, "align")
    fwd, bwd = targets.FORWARD[kind], targets.BACKWARD[kind]
    if transform in REVERSE | VMAPPED_FORWARD | {"jit"}:
        # Reverse mode alone (vjp, jacrev) needs no primal output: its forward call is dead code.
        assert _count(text, fwd) == (0 if transform in {"vjp", "jacrev", "vmap-of-jacrev"} else 1)
        boxes_only = transform == "vmap-of-jacrev" and op in FLAT_IN_BOXES
        assert _count(text, bwd) == (1 if transform in REVERSE and not boxes_only else 0)


@pytest.mark.parametrize("transform", ["grad", "hessian", "vmap-of-grad", "jvp-of-vmap"])
def test_default_path_matches_pure_jax(transform):
    """``implementation=None`` picks the kernels where they are built (the pure-JAX path
    elsewhere) and composes the same way."""
    from jax_roi import ops

    expected_module = "jax_roi.ffi.ops" if KERNELS else "jax_roi.xla"
    assert ops._implementation_module(None).__name__ == expected_module
    feats, boxes = _inputs("align-avg-adaptive", "per_image")
    _close(_apply(transform, "align-avg-adaptive", None, feats, boxes),
           _reference("align-avg-adaptive", "per_image", transform))


# ----------------------------------------------------------------------------- the reference path


def _flat(x):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(x)])


def _identity_cases():
    """Every op in both box forms. In the quick subset the position-sensitive ops keep their
    per-image form (rois share its rules); rotated RoIAlign's sample-by-sample backward makes
    its fifteen compiles minutes long, so it is whole-suite only (tests/test_rotated.py checks
    its vmap, forward mode and Hessian quickly)."""
    for op in OPS:
        for form in ("rois", "per_image"):
            slow = op in ROTATED_OPS or (op.startswith("ps-") and form == "rois")
            yield pytest.param(op, form, marks=(pytest.mark.slow,) if slow else (), id=f"{op}-{form}")


@pytest.mark.parametrize("op, form", list(_identity_cases()))
def test_pure_jax_transforms_agree_with_identities(op, form):
    """The reference path checked against identities that do not use the transform."""
    feats, boxes = _inputs(op, form)
    fn = lambda f, b: OPS[op](f, b, "xla")  # noqa: E731
    out = fn(feats, boxes)
    _close(_reference(op, form, "jit"), out)
    # jvp against vjp: <u, J v> = <J^T u, v>, for features and boxes together.
    tf, tb = _with_tangent(feats, 12), _box_tangent(boxes, 13)
    _, jv = _reference(op, form, "jvp")
    u = _with_tangent(out, 11)
    jtu = _reference(op, form, "vjp")
    np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(_flat(jtu[0]), _flat(tf)) + jnp.vdot(jtu[1], tb),
                               rtol=1e-9, atol=1e-9)
    # jacfwd against jacrev.
    _close(_reference(op, form, "jacfwd"), _reference(op, form, "jacrev"))
    # grad against the vjp of the loss; checkpoint, scan (weights 1 + 2) and cond against grad.
    grad = _reference(op, form, "grad")
    _close(_reference(op, form, "checkpoint"), grad)
    _close(_reference(op, form, "scan"), jax.tree.map(lambda g: 3 * g, grad))
    _close(_reference(op, form, "cond"), grad)
    # Hessian (boxes block) against central differences of the gradient.
    hess = _reference(op, form, "hessian")[1][1]
    eps = 1e-6
    d = _box_tangent(boxes, 21)
    g = lambda b: jax.grad(_loss(fn), argnums=1)(feats, b)  # noqa: E731
    fd = (g(boxes + eps * d) - g(boxes - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.tensordot(hess, d, axes=d.ndim), fd, atol=1e-5, rtol=1e-5)
    # vmap against a Python loop over the mapped elements.
    fs, bs = _stack(feats), _stack(boxes)
    loop = lambda h, xs: jnp.stack([h(*x) for x in xs])  # noqa: E731
    _close(_reference(op, form, "vmap-both"), loop(fn, [(jax.tree.map(lambda a: a[i], fs), bs[i]) for i in range(2)]))
    _close(_reference(op, form, "vmap-features"), loop(fn, [(jax.tree.map(lambda a: a[i], fs), boxes) for i in range(2)]))
    _close(_reference(op, form, "vmap-boxes"), loop(fn, [(feats, bs[i]) for i in range(2)]))
    grads = [jax.grad(_loss(fn), argnums=(0, 1))(jax.tree.map(lambda a: a[i], fs), bs[i]) for i in range(2)]
    _close(_reference(op, form, "vmap-of-grad"), jax.tree.map(lambda *g: jnp.stack(g), *grads))
