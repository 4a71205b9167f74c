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
                             jnp.asarray(ny, jnp.int32), jnp.asarray(nx, jnp.int32), static=bool(static),
                             batched=False)


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


def _abstract(features, base, ry, wy, rx, wx, ny, nx, *, static, batched):
    acc = accumulation_dtype(features.dtype)
    lead = features.shape[:1] if batched else ()
    return jax.core.ShapedArray(lead + (ry.shape[-3], ry.shape[-2], rx.shape[-2], features.shape[-1]), acc)


def _per_element(fn, batched):
    """``fn`` over the operands' leading axis when the call is ``batched`` (every array
    operand but the tap counts leads with it): a batched gather, whose batch axis XLA's
    partitioner keeps (a batch-sharded jit stays local)."""
    if not batched:
        return fn
    return jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, 0, None, None))


def _evaluate(features, base, ry, wy, rx, wx, ny, nx, *, static, batched):
    return _per_element(lambda *a: _forward(*a, static=static), batched)(features, base, ry, wy, rx, wx, ny, nx)


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


def _transpose(g, features, base, ry, wy, rx, wx, ny, nx, *, static, batched):
    undefined = [ad.is_undefined_primal(v) for v in (features, wy, wx)]
    if sum(undefined) != 1:
        raise NotImplementedError("gather_sum is linear in one of features, wy, wx at a time")
    if type(g) is ad.Zero:
        return [None] * 8
    out = [None] * 8
    if undefined[0]:
        aval = features.aval
        one = jax.core.ShapedArray(aval.shape[1:] if batched else aval.shape, aval.dtype)
        fn = lambda g, base, ry, wy, rx, wx, ny, nx: _transpose_features(  # noqa: E731
            g, one, base, ry, wy, rx, wx, ny, nx, static)
        out[0] = _per_element(fn, batched)(g, base, ry, wy, rx, wx, ny, nx)
    else:
        which = "y" if undefined[1] else "x"
        table = wy if which == "y" else wx
        aval = table.aval
        one = jax.core.ShapedArray(aval.shape[1:] if batched else aval.shape, aval.dtype)
        known = wx if which == "y" else wy

        def fn(g, features, base, ry, known, rx, ny, nx):
            y, x = (ad.UndefinedPrimal(one), known) if which == "y" else (known, ad.UndefinedPrimal(one))
            return _transpose_weights(g, features, base, ry, y, rx, x, ny, nx, static, which)

        in_axes = (0, 0, 0, 0, 0, 0, None, None)
        res = (jax.vmap(fn, in_axes=in_axes) if batched else fn)(g, features, base, ry, known, rx, ny, nx)
        out[3 if which == "y" else 5] = res
    return out


def _jvp(primals, tangents, *, static, batched):
    features, base, ry, wy, rx, wx, ny, nx = primals
    d_features, _, _, d_wy, _, d_wx, _, _ = tangents
    out = gather_sum_p.bind(*primals, static=static, batched=batched)
    terms = []
    if type(d_features) is not ad.Zero:
        terms.append(gather_sum_p.bind(d_features, base, ry, wy, rx, wx, ny, nx, static=static, batched=batched))
    if type(d_wy) is not ad.Zero:
        terms.append(gather_sum_p.bind(features, base, ry, d_wy, rx, wx, ny, nx, static=static, batched=batched))
    if type(d_wx) is not ad.Zero:
        terms.append(gather_sum_p.bind(features, base, ry, wy, rx, d_wx, ny, nx, static=static, batched=batched))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    tangent = terms[0]
    for t in terms[1:]:
        tangent = tangent + t
    return out, tangent


def _batch(args, dims, *, static, batched):
    """A mapped map makes the call batched (a new leading axis on every operand, nested
    maps folded into it): the per-image form stays a batched gather, whose batch axis a
    sharded jit partitions. A shared map keeps the call as it is, the mapped axis folded
    into the box axis K (no copy of the map)."""
    features, base, ry, wy, rx, wx, ny, nx = args
    fd = dims[0]
    n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def lead(x, d):
        return jnp.broadcast_to(x, (n,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)

    def fold(x):
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    ny = jnp.max(ny, axis=dims[6]) if dims[6] is not None else ny
    nx = jnp.max(nx, axis=dims[7]) if dims[7] is not None else nx
    tables = [lead(a, d) for a, d in zip(args[1:6], dims[1:6])]
    if fd is not None:
        features = lead(features, fd)
        if batched:  # nested: the new axis joins the existing one
            features, tables = fold(features), [fold(t) for t in tables]
        out = gather_sum_p.bind(features, *tables, ny, nx, static=static, batched=True)
        return (out.reshape((n, out.shape[0] // n) + out.shape[1:]) if batched else out), 0
    if batched:  # [n, G, K, ...] -> [G, n*K, ...]: fold into each element's boxes
        tables = [jnp.swapaxes(t, 0, 1) for t in tables]
        tables = [t.reshape((t.shape[0], t.shape[1] * t.shape[2]) + t.shape[3:]) for t in tables]
        out = gather_sum_p.bind(features, *tables, ny, nx, static=static, batched=True)
        out = out.reshape((out.shape[0], n, out.shape[1] // n) + out.shape[2:])
        return jnp.swapaxes(out, 0, 1), 0
    out = gather_sum_p.bind(features, *[fold(t) for t in tables], ny, nx, static=static, batched=False)
    return out.reshape((n, out.shape[0] // n) + out.shape[1:]), 0


gather_sum_p = Primitive("jax_roi_gather_sum")
gather_sum_p.def_impl(_evaluate)
gather_sum_p.def_abstract_eval(_abstract)
mlir.register_lowering(gather_sum_p, mlir.lower_fun(_evaluate, multiple_results=False))
ad.primitive_jvps[gather_sum_p] = _jvp
ad.primitive_transposes[gather_sum_p] = _transpose
batching.primitive_batchers[gather_sum_p] = _batch
