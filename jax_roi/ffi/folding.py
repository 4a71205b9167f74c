"""Folding a leading axis of the kernel operands into the box or image axis.

The kernels read roi ``k`` from image ``trunc(rois[k, 0])`` of one stacked map. A mapped
axis (from ``vmap``) or a group axis (one group per image of the per-image box form) is
therefore folded away by stacking the maps along the image axis (a reshape, no copy) and
offsetting each element's batch indices to its own images. A dead batch index (outside
its element's range, or NaN) stays dead (-1).
"""

from __future__ import annotations

import jax.numpy as jnp


def fold(x):
    """``[N, M, ...] -> [N*M, ...]``."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold(x, n):
    """``[N*M, ...] -> [N, M, ...]``."""
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def lead(x, axis, n):
    """``x`` with its mapped axis first; an unmapped ``x`` (axis None) is broadcast (only
    ever done for rois, levels and cotangents: small next to the maps)."""
    if axis is None:
        return jnp.broadcast_to(x, (n,) + x.shape)
    return jnp.moveaxis(x, axis, 0)


def _live(b, limit):
    return (b > -1) & (b < limit)  # trunc(b) in [0, limit); False for NaN


def offset_rois(rois, num_images):
    """``rois [N, K, 5] -> [N*K, 5]``: a live index ``b`` of element ``n`` (``b`` in
    ``[0, num_images)``) becomes ``trunc(b) + n*num_images``."""
    n = rois.shape[0]
    b = rois[..., 0]
    live = _live(b, num_images)
    shift = (jnp.arange(n, dtype=rois.dtype) * num_images)[:, None]
    new_b = jnp.where(live, jnp.trunc(jnp.where(live, b, 0)) + shift, -1)
    return fold(rois.at[..., 0].set(new_b))


def fold_groups(rois, images, factor=1):
    """``rois [G, K, 5] -> [G*K, 5]`` for ``G`` groups of ``images`` maps stacked into
    ``G*images``, whose backward writes ``factor`` gradient copies per map.

    Within a group a live index ``b`` lies in ``[0, factor*images)`` and means copy
    ``b // images`` of map ``b % images``. After folding, index ``b'`` must read map
    ``b' % (G*images)`` and write gradient image ``b'``, so copy ``t`` of group ``j``'s map
    ``i`` becomes ``t*G*images + j*images + i``: the gradient comes out ``[factor, G,
    images]``-ordered (:func:`ungroup_gradient` puts it back)."""
    g = rois.shape[0]
    b = rois[..., 0]
    live = _live(b, factor * images)
    bi = jnp.trunc(jnp.where(live, b, 0))
    copy, image = jnp.floor(bi / images), jnp.mod(bi, images)
    group = jnp.arange(g, dtype=rois.dtype)[:, None]
    new_b = jnp.where(live, copy * (g * images) + group * images + image, -1)
    return fold(rois.at[..., 0].set(new_b))


def ungroup_gradient(d, groups, factor):
    """``[factor*G*images, ...]`` (from a :func:`fold_groups` call) ``-> [G, factor*images, ...]``."""
    d = d.reshape((factor, groups, d.shape[0] // (factor * groups)) + d.shape[1:])
    d = jnp.swapaxes(d, 0, 1)
    return d.reshape((groups, -1) + d.shape[3:])
