"""``vmap`` rules of the kernel primitives: a mapped axis never multiplies the calls.

* Only the rois (and levels, cotangents) mapped: the axis folds into the box axis K, and
  the maps are read as they are (no broadcast, no copy).
* A map mapped: each element becomes a group (``primitives``' grouped form: one call, its
  groups stacked along the image axis by a reshape).
* In the backward of a shared map, each mapped element must get its own gradient: the
  target writes ``factor`` gradient copies, element ``n``'s rois offset to copy ``n``.

The tangent primitive is batched through what it means (``tangent_semantics``, made of the
forward primitive and pure JAX), which only forward mode under ``vmap`` evaluates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from jax_roi.ffi import primitives as P
from jax_roi.ffi.folding import fold, lead, offset_rois, unfold


def _size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _into_boxes(x, groups_first):
    """``[n, G, K, ...] -> [G, n*K, ...]`` (``groups_first``) or ``[n, K, ...] -> [n*K, ...]``."""
    if not groups_first:
        return fold(x)
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _out_of_boxes(x, n, groups_first):
    """The inverse of :func:`_into_boxes`, mapped axis first."""
    if not groups_first:
        return unfold(x, n)
    x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _into_groups(x, grouped):
    """``[n, ...]`` -> the grouped operand: a new group axis, or folded into the groups."""
    return fold(x) if grouped else x


def _out_of_groups(x, n, grouped):
    return unfold(x, n) if grouped else x


def _forward_rule(args, dims, *, cfg, grouped):
    rois, level, *features = args
    rd, ld, *fds = dims
    n = _size(args, dims)
    if all(d is None for d in fds):
        out = P.forward(_into_boxes(lead(rois, rd, n), grouped), _into_boxes(lead(level, ld, n), grouped),
                        features, cfg=cfg, grouped=grouped)
        return _out_of_boxes(out, n, grouped), 0
    feats = [_into_groups(lead(f, d, n), grouped) for f, d in zip(features, fds)]
    out = P.forward(_into_groups(lead(rois, rd, n), grouped), _into_groups(lead(level, ld, n), grouped), feats,
                    cfg=cfg, grouped=True)
    return _out_of_groups(out, n, grouped), 0


def _backward_rule(args, dims, *, cfg, grouped, rois_grad, factor):
    cot, rois, level, *features = args
    cd, rd, ld, *fds = dims
    n = _size(args, dims)
    if all(d is None for d in fds):
        # Shared maps: element n's rois write gradient copy n (of `factor` per element).
        copies = factor * features[0].shape[-4]
        offset = (lambda r: offset_rois(r, copies)) if not grouped else (
            lambda r: jax.vmap(lambda g: offset_rois(g, copies))(jnp.swapaxes(r, 0, 1)))
        d_rois, d_feats = P.backward(_into_boxes(lead(cot, cd, n), grouped), offset(lead(rois, rd, n)),
                                     _into_boxes(lead(level, ld, n), grouped), features, cfg=cfg, grouped=grouped,
                                     rois_grad=rois_grad, factor=n * factor)
        d_feats = [_out_of_boxes(d, n, grouped) for d in d_feats]
        return [_out_of_boxes(d_rois, n, grouped), *d_feats], [0] * (1 + len(features))
    feats = [_into_groups(lead(f, d, n), grouped) for f, d in zip(features, fds)]
    d_rois, d_feats = P.backward(_into_groups(lead(cot, cd, n), grouped), _into_groups(lead(rois, rd, n), grouped),
                                 _into_groups(lead(level, ld, n), grouped), feats, cfg=cfg, grouped=True,
                                 rois_grad=rois_grad, factor=factor)
    outs = [_out_of_groups(d, n, grouped) for d in (d_rois, *d_feats)]
    return outs, [0] * len(outs)


def _tangent_rule(args, dims, **params):
    out = jax.vmap(functools.partial(P.tangent_semantics, **params), in_axes=tuple(dims))(*args)
    return out, 0


batching.primitive_batchers[P.forward_p] = _forward_rule
batching.primitive_batchers[P.backward_p] = _backward_rule
batching.primitive_batchers[P.tangent_p] = _tangent_rule
