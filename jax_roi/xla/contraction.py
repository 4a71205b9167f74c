r"""The separable gather-sum at the heart of average RoIAlign, with its own VJP.

.. math::  out[k, p, q, :] = \sum_{t < n_y} \sum_{s < n_x}
           w^y[k, p, t]\, w^x[k, q, s]\; F[b_k, r^y[k, p, t], r^x[k, q, s], :]

A gather per ``(t, s)`` reads one ``C``-vector per output cell; nothing of size
``[K, oh*G, ow*G, C]`` and no copy of the map per box is ever formed.

Why a ``custom_vjp``: the tap counts ``n_y, n_x`` are data-dependent in adaptive mode
(the largest distinct-row count over all bins), so the loops are ``while`` loops, which
reverse-mode autodiff cannot transpose. The VJP is written out instead; it is exact (the
map is bilinear in ``F`` and in the weights): the feature cotangent is the transposed
gather (a scatter-add), the weight cotangents are the same gathers reduced over channels.
The weights themselves are differentiable functions of the boxes (``sampling.py``), so
``jax.grad`` with respect to boxes still comes from autodiff through them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def accumulation_dtype(dtype) -> jnp.dtype:
    """16-bit inputs accumulate in float32 (docs/semantics.md); float64 stays float64."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _cell(base, ry, wy, rx, wx, t, s, acc):
    """Flat row indices ``[K, P, Q]`` and product weights of tap pair ``(t, s)``."""
    idx = base[:, None, None] + ry[:, :, t][:, :, None] + rx[:, :, s][:, None, :]
    w = (wy[:, :, t][:, :, None] * wx[:, :, s][:, None, :]).astype(acc)
    return idx, w


def _gather(features, idx, acc):
    return features.at[idx].get(mode="promise_in_bounds").astype(acc)


def _loop(count, static_bound, body, carry, unroll_static):
    """``for i in range(count)``: unrolled in Python when the count is static (so XLA fuses
    the taps into one pass), else a ``fori_loop`` over the traced count."""
    if unroll_static:
        for i in range(static_bound):
            carry = body(i, carry)
        return carry
    return lax.fori_loop(0, count, body, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def separable_gather_sum(features, base, ry, wy, rx, wx, ny, nx, static):
    """``features [N, C]``; ``base [K]`` flat offset of each box's image; ``ry [K, P, T]``
    row offsets (already times W) and ``wy`` their weights; ``rx [K, Q, S]``, ``wx``
    likewise for columns; ``ny, nx`` int32 scalars: how many leading taps to visit
    (ignored when ``static``, which visits all ``T x S``). Returns ``[K, P, Q, C]`` in the
    accumulation dtype."""
    return _forward(features, base, ry, wy, rx, wx, ny, nx, static)


def _forward(features, base, ry, wy, rx, wx, ny, nx, static):
    acc = accumulation_dtype(features.dtype)
    k, p, t_bound = ry.shape
    q, s_bound = rx.shape[1], rx.shape[2]
    out = jnp.zeros((k, p, q, features.shape[-1]), acc)

    def over_t(t, out):
        def over_s(s, out):
            idx, w = _cell(base, ry, wy, rx, wx, t, s, acc)
            return out + w[..., None] * _gather(features, idx, acc)

        return _loop(nx, s_bound, over_s, out, static)

    return _loop(ny, t_bound, over_t, out, static)


def _fwd(features, base, ry, wy, rx, wx, ny, nx, static):
    out = _forward(features, base, ry, wy, rx, wx, ny, nx, static)
    return out, (features, base, ry, wy, rx, wx, ny, nx)


def _bwd(static, residuals, g):
    features, base, ry, wy, rx, wx, ny, nx = residuals
    acc = accumulation_dtype(features.dtype)
    g = g.astype(acc)
    t_bound, s_bound = ry.shape[2], rx.shape[2]
    carry = (jnp.zeros(features.shape, acc), jnp.zeros(wy.shape, acc), jnp.zeros(wx.shape, acc))

    def over_t(t, carry):
        def over_s(s, carry):
            d_features, d_wy, d_wx = carry
            idx, w = _cell(base, ry, wy, rx, wx, t, s, acc)
            d_features = d_features.at[idx].add(w[..., None] * g, mode="promise_in_bounds")
            # d out / d w[k,p,q] = <g, F[idx]> over channels, then split into the factors.
            gv = jnp.sum(g * _gather(features, idx, acc), axis=-1)  # [K, P, Q]
            d_wy = d_wy.at[:, :, t].add(jnp.sum(gv * wx[:, None, :, s].astype(acc), axis=2))
            d_wx = d_wx.at[:, :, s].add(jnp.sum(gv * wy[:, :, t, None].astype(acc), axis=1))
            return d_features, d_wy, d_wx

        return lax.fori_loop(0, s_bound if static else nx, over_s, carry)

    # Always a loop: unrolled scatter-adds keep every gather alive and run slower.
    d_features, d_wy, d_wx = lax.fori_loop(0, t_bound if static else ny, over_t, carry)
    return (d_features.astype(features.dtype), None, None, d_wy.astype(wy.dtype), None,
            d_wx.astype(wx.dtype), None, None)


separable_gather_sum.defvjp(_fwd, _bwd)
