r"""The separable gather-sum at the heart of average RoIAlign, as a JAX primitive.

.. math::  out[k, p, q, :] = \sum_{t < n_y} \sum_{s < n_x}
           w^y[k, p, t]\, w^x[k, q, s]\; F[b_k + r^y[k, p, t] + r^x[k, q, s], :]

A gather per ``(t, s)`` reads one ``C``-vector per output cell; nothing of size
``[K, oh*G, ow*G, C]`` and no copy of the map per box is ever formed.

Why a primitive: the tap counts ``n_y, n_x`` are data-dependent in adaptive mode (the
largest distinct-row count over all bins), so the loops are ``while`` loops, which
reverse-mode autodiff cannot transpose. The map is linear in each of ``F``, ``w^y`` and
``w^x`` separately, so the primitive carries its own rules:

* JVP: one gather-sum per tangent, each linear in its tangent slot;
* transpose: for ``F`` the transposed gather (a scatter-add), for a weight table the same
  gathers reduced over channels (plain JAX, so forward mode can differentiate them again:
  ``jax.hessian`` works);
* batching: a mapped axis folds into the box axis (and into the map's rows when the map
  is mapped), so ``vmap`` stays one gather-sum and never copies the map.

The weights themselves are differentiable functions of the boxes (``sampling.py``), so
derivatives with respect to boxes come from autodiff through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def accumulation_dtype(dtype) -> jnp.dtype:
    """16-bit inputs accumulate in float32; float64 stays float64."""
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


def separable_gather_sum(features, base, ry, wy, rx, wx, ny, nx, static):
    """``features [N, C]``; ``base [K]`` flat offset of each box's image; ``ry [K, P, T]``
    row offsets (already times W) and ``wy`` their weights; ``rx [K, Q, S]``, ``wx``
    likewise for columns; ``ny, nx`` int32 scalars: how many leading taps to visit
    (ignored when ``static``, which visits all ``T x S``). Returns ``[K, P, Q, C]`` in the
    accumulation dtype."""
    acc = accumulation_dtype(features.dtype)
    return gather_sum_p.bind(features, base, ry, wy.astype(acc), rx, wx.astype(acc),
                             jnp.asarray(ny, jnp.int32), jnp.asarray(nx, jnp.int32), static=bool(static))


def _forward(features, base, ry, wy, rx, wx, ny, nx, *, static):
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


def _abstract(features, base, ry, wy, rx, wx, ny, nx, *, static):
    acc = accumulation_dtype(features.dtype)
    return jax.core.ShapedArray((ry.shape[0], ry.shape[1], rx.shape[1], features.shape[-1]), acc)


def _pairs(ry, rx, ny, nx, static):
    """``(t, s)`` loop bounds of the transposes: always loops (unrolled scatter-adds keep
    every gather alive and run slower)."""
    return (ry.shape[2], rx.shape[2]) if static else (ny, nx)


def _transpose_features(g, features_aval, base, ry, wy, rx, wx, ny, nx, static):
    acc = g.dtype
    t_bound, s_bound = _pairs(ry, rx, ny, nx, static)

    def over_t(t, d):
        def over_s(s, d):
            idx, w = _cell(base, ry, wy, rx, wx, t, s, acc)
            return d.at[idx].add(w[..., None] * g, mode="promise_in_bounds")

        return lax.fori_loop(0, s_bound, over_s, d)

    d = lax.fori_loop(0, t_bound, over_t, jnp.zeros(features_aval.shape, acc))
    return d.astype(features_aval.dtype)


def _transpose_weights(g, features, base, ry, wy, rx, wx, ny, nx, static, which):
    """Cotangent of ``wy`` (``which="y"``; ``wy`` is the unknown, an ``UndefinedPrimal``)
    or ``wx``: ``<g, F[idx]>`` over channels, times the other factor, summed over the
    other axis."""
    acc = g.dtype
    t_bound, s_bound = _pairs(ry, rx, ny, nx, static)
    shape = (wy if which == "y" else wx).aval.shape
    unit = jnp.ones(shape, acc)  # stands in for the unknown table in _cell

    def over_t(t, d):
        def over_s(s, d):
            y, x = (unit, wx) if which == "y" else (wy, unit)
            idx, w = _cell(base, ry, y, rx, x, t, s, acc)
            gv = jnp.sum(g * _gather(features, idx, acc), axis=-1) * w  # [K, P, Q]
            if which == "y":
                return d.at[:, :, t].add(jnp.sum(gv, axis=2))
            return d.at[:, :, s].add(jnp.sum(gv, axis=1))

        return lax.fori_loop(0, s_bound, over_s, d)

    return lax.fori_loop(0, t_bound, over_t, jnp.zeros(shape, acc))


def _transpose(g, features, base, ry, wy, rx, wx, ny, nx, *, static):
    undefined = [ad.is_undefined_primal(v) for v in (features, wy, wx)]
    if sum(undefined) != 1:
        raise NotImplementedError("gather_sum is linear in one of features, wy, wx at a time")
    if type(g) is ad.Zero:
        return [None] * 8
    out = [None] * 8
    if undefined[0]:
        out[0] = _transpose_features(g, features.aval, base, ry, wy, rx, wx, ny, nx, static)
    elif undefined[1]:
        out[3] = _transpose_weights(g, features, base, ry, wy, rx, wx, ny, nx, static, "y")
    else:
        out[5] = _transpose_weights(g, features, base, ry, wy, rx, wx, ny, nx, static, "x")
    return out


def _jvp(primals, tangents, *, static):
    features, base, ry, wy, rx, wx, ny, nx = primals
    d_features, _, _, d_wy, _, d_wx, _, _ = tangents
    out = gather_sum_p.bind(*primals, static=static)
    terms = []
    if type(d_features) is not ad.Zero:
        terms.append(gather_sum_p.bind(d_features, base, ry, wy, rx, wx, ny, nx, static=static))
    if type(d_wy) is not ad.Zero:
        terms.append(gather_sum_p.bind(features, base, ry, d_wy, rx, wx, ny, nx, static=static))
    if type(d_wx) is not ad.Zero:
        terms.append(gather_sum_p.bind(features, base, ry, wy, rx, d_wx, ny, nx, static=static))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    tangent = terms[0]
    for t in terms[1:]:
        tangent = tangent + t
    return out, tangent


def _batch(args, dims, *, static):
    """Folds the mapped axis into the box axis K; a mapped map folds into its rows, each
    mapped element's boxes offset to their own copy's rows."""
    features, base, ry, wy, rx, wx, ny, nx = args
    fd, bd, ryd, wyd, rxd, wxd, nyd, nxd = dims
    n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def lead(x, d):
        return jnp.broadcast_to(x, (n,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)

    def fold(x):
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    base_b = lead(base, bd)
    if fd is not None:
        features = jnp.moveaxis(features, fd, 0)
        rows = features.shape[1]
        base_b = base_b + (jnp.arange(n, dtype=base_b.dtype) * rows)[:, None]
        features = fold(features)
    ny = jnp.max(ny, axis=nyd) if nyd is not None else ny
    nx = jnp.max(nx, axis=nxd) if nxd is not None else nx
    out = gather_sum_p.bind(features, fold(base_b), fold(lead(ry, ryd)), fold(lead(wy, wyd)),
                            fold(lead(rx, rxd)), fold(lead(wx, wxd)), ny, nx, static=static)
    return out.reshape((n, out.shape[0] // n) + out.shape[1:]), 0


gather_sum_p = Primitive("jax_roi_gather_sum")
gather_sum_p.def_impl(lambda *args, static: _forward(*args, static=static))
gather_sum_p.def_abstract_eval(_abstract)
mlir.register_lowering(gather_sum_p, mlir.lower_fun(_forward, multiple_results=False))
ad.primitive_jvps[gather_sum_p] = _jvp
ad.primitive_transposes[gather_sum_p] = _transpose
batching.primitive_batchers[gather_sum_p] = _batch
