"""Opt-in value checks: turn the inputs that the ops silently absorb into errors.

The ops never fail on values (docs/semantics.md): a padding batch index gives a zero row, a NaN
box zeros and zero gradients, an absurd box a bounded-time result. That is what a training
loop wants, but while debugging a data pipeline one may prefer to hear about them.
:func:`check_boxes` adds ``jax.experimental.checkify`` checks that work under ``jit``::

    from jax.experimental import checkify

    def head(features, boxes):
        boxes = jax_roi.check_boxes(features, boxes, spatial_scale=1 / 16)
        return jax_roi.roi_align(features, boxes, 7, spatial_scale=1 / 16)

    err, out = jax.jit(checkify.checkify(head))(features, boxes)
    err.throw()  # raises with the first offending box

With per-image ``[B, R, 4]`` boxes the ops map over images with data-dependent loops,
which checkify cannot enter (checkify-of-vmap-of-while); check the boxes on their own
there: ``err, _ = jax.jit(checkify.checkify(jax_roi.check_boxes))(features, boxes)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import checkify

from jax_roi import _inputs


def check_boxes(features, boxes, *, spatial_scale=1.0, data_format="NHWC", max_extent=None,
                allow_padding=False):
    """Returns ``boxes`` unchanged, with checkify checks that each box is usable.

    Checked, for every box: its coordinates are finite; in feature pixels
    (``x * spatial_scale``) they lie within ``max_extent`` of the map (default: 16 times
    the larger map side), so an absurd box (say 1e30 wide) is caught; for ``[K, 5]`` rois
    the batch index is an integer in ``[0, B)`` (or -1, the padding convention, when
    ``allow_padding``). Static problems (shapes, dtypes) raise at once as the ops do.

    Must run under ``checkify.checkify`` (see the module docstring).
    """
    canon = _inputs.canonicalize(features, boxes, data_format)
    scale = _inputs.static_float("spatial_scale", spatial_scale)
    num_images, height, width, _ = canon.features.shape
    limit = float(16 * max(height, width) if max_extent is None else max_extent)
    coords = (canon.rois[:, 1:] if canon.boxes is None else canon.boxes.reshape(-1, 4))
    index = jnp.arange(coords.shape[0])
    bad = jnp.logical_not(jnp.all(jnp.isfinite(coords), axis=1))
    first = jnp.argmax(bad)
    checkify.check(~jnp.any(bad), "boxes: expected finite coordinates, got box {} = {}", index[first],
                   coords[first])
    size = jnp.asarray([width, height, width, height], coords.dtype)
    far = jnp.any((coords * scale < -limit) | (coords * scale > size + limit), axis=1) & ~bad
    first = jnp.argmax(far)
    checkify.check(~jnp.any(far), f"boxes: expected coordinates within {limit:g} feature pixels of the "
                   f"{height}x{width} map (spatial_scale={scale:g}), got box {{}} = {{}}", index[first],
                   coords[first])
    if canon.boxes is None:
        batch = canon.rois[:, 0]
        ok = (batch >= 0) & (batch < num_images) & (batch == jnp.floor(batch))
        if allow_padding:
            ok = ok | (batch == -1)
        first = jnp.argmax(~ok)
        checkify.check(jnp.all(ok), f"boxes: expected batch indices in [0, {num_images})"
                       f"{' or -1' if allow_padding else ''}, got {{}} at box {{}}", batch[first], index[first])
    return boxes
