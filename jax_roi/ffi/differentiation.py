"""Derivatives of the kernel primitives: every order of forward and reverse mode that the
transforms ask for.

* ``forward``'s JVP is the ``tangent`` primitive, linear in the tangents. Reverse mode
  (``grad``, ``vjp``, ``jacrev``) transposes it into ONE ``backward`` call: the backward
  kernel, with the box gradient computed only when the boxes are differentiated.
* Forward mode (``jvp``, ``jacfwd``) evaluates ``tangent``: the forward kernel for the
  features of average RoIAlign/RoIWarp (linear in them), the pure-JAX path's forward mode
  for the rest (the boxes' tangent, the max reductions).
* ``backward`` and ``tangent`` differentiate through their pure-JAX meaning
  (``fallback``), which gives second derivatives (``hessian`` = forward over reverse).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from jax_roi.ffi import fallback
from jax_roi.ffi import primitives as P


def _is_zero(t):
    return type(t) is ad.Zero


def _instantiate(t, primal):
    return jnp.zeros(jnp.shape(primal), jnp.result_type(primal)) if _is_zero(t) else t


def _forward_jvp(primals, tangents, *, cfg, grouped):
    rois, level, *features = primals
    d_rois, _, *d_features = tangents
    out = P.forward(rois, level, features, cfg=cfg, grouped=grouped)
    has_rois = not _is_zero(d_rois) and cfg.has_box_gradient
    has_features = not all(_is_zero(d) for d in d_features)
    if not (has_rois or has_features):
        return out, ad.Zero(jax.typeof(out).to_tangent_aval())
    d_rois = _instantiate(d_rois, rois)
    d_features = [_instantiate(d, f) for d, f in zip(d_features, features)]
    return out, P.tangent(d_rois, d_features, rois, level, features, cfg=cfg, grouped=grouped,
                          tangents=(has_rois, has_features))


def _tangent_transpose(ct, *args, cfg, grouped, tangents):
    d_rois, d_features, rois, level, features = P.split_tangent_args(args)
    nones = [None] * len(args)
    if _is_zero(ct):
        return nones
    want_rois = ad.is_undefined_primal(d_rois) and cfg.has_box_gradient
    want_features = [ad.is_undefined_primal(d) for d in d_features]
    if not (want_rois or any(want_features)):
        return nones
    g_rois, g_features = P.backward(ct, rois, level, features, cfg=cfg, grouped=grouped, rois_grad=want_rois)
    out = list(nones)
    if want_rois:
        out[0] = g_rois.astype(d_rois.aval.dtype)
    for i, (want, g) in enumerate(zip(want_features, g_features)):
        if want:
            out[1 + i] = g.astype(d_features[i].aval.dtype)
    return out


def _backward_semantics(cot, rois, level, *features, cfg, grouped, rois_grad, factor):
    one = functools.partial(fallback.backward, cfg, rois_grad, factor)
    if grouped:
        return jax.vmap(lambda c, r, l, fs: one(c, r, l, fs))(cot, rois, level, tuple(features))
    return one(cot, rois, level, tuple(features))


def _differentiable(x):
    return not jnp.issubdtype(jnp.result_type(x), jnp.integer)


def _through_semantics(semantics, primitive):
    """A JVP rule: the primal from the primitive (its kernels), the tangent from forward
    mode through the primitive's pure-JAX meaning (integer operands held constant)."""
    def rule(primals, tangents, **params):
        out = primitive.bind(*primals, **params)
        keep = [_differentiable(p) for p in primals]

        def fn(*diff):
            it = iter(diff)
            return semantics(*(next(it) if k else p for k, p in zip(keep, primals)), **params)

        diff_primals = [p for k, p in zip(keep, primals) if k]
        diff_tangents = [_instantiate(t, p) for k, t, p in zip(keep, tangents, primals) if k]
        _, t_out = jax.jvp(fn, diff_primals, diff_tangents)
        return out, (list(t_out) if primitive.multiple_results else t_out)
    return rule


ad.primitive_jvps[P.forward_p] = _forward_jvp
ad.primitive_transposes[P.tangent_p] = _tangent_transpose
ad.primitive_jvps[P.tangent_p] = _through_semantics(P.tangent_semantics, P.tangent_p)
ad.primitive_jvps[P.backward_p] = _through_semantics(_backward_semantics, P.backward_p)
