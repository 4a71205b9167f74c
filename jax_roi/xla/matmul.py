r"""Average RoIAlign / RoIWarp as dense contractions: no gather and no scatter, for TPU.

Average RoIAlign is separable. With ``Ay[k, p, h]`` the summed (and averaged) bilinear
weight of map row ``h`` over the samples of output row ``p`` of box ``k``, and ``Ax[k, q, w]``
likewise for columns,

.. math::  out[k, p, q, c] = \sum_{b, h, w} S[k, b]\, Ay[k, p, h]\, F[b, h, w, c]\, Ax[k, q, w]

where ``S[k, b] = [b == b_k]`` selects the box's image. Every factor is built with
elementwise arithmetic from the per-axis tap tables of ``sampling.axis_taps`` (the same
tables the gather path uses, so the geometry, validity rules and edge boxes are shared):
``Ay = sum_g [lo == iota] * w_lo + [hi == iota] * w_hi``, a one-hot comparison against an
iota times the weights, reduced over the ``G`` samples of the bin. The contraction is two
``dot_general``\ s, which run on the matrix units. Reverse-mode autodiff transposes them
into ``dot_general``\ s again and differentiates the one-hot products through their
weights (the comparisons are integer and carry no derivative), which gives the gradient
with respect to the features *and* the boxes; nothing lowers to a gather, scatter or
data-indexed dynamic slice, forward or backward (tests/test_matmul_formulation.py checks
the TPU lowering).

Contraction order
-----------------
The image one-hot is folded into the row matrix, ``A'[k, p, (b, h)] = S[k, b] Ay[k, p, h]``
(``K*oh*B*H`` elementwise). Then, in multiply-adds (MAC; FLOPs = 2 MAC), either

* rows first: ``T[k, p, w, c] = A' @ F`` as one ``[K*oh, B*H] x [B*H, W*C]`` matmul
  (``K*oh*B*H*W*C``), then ``out = T x_w Ax`` batched over boxes (``K*oh*ow*W*C``); or
* columns first: ``U[k, q, b, h, c] = Ax @ F`` as ``[K*ow, W] x [W, B*H*C]``
  (``K*ow*B*H*W*C``), then ``out = A' x_(b,h) U`` batched over boxes (``K*oh*ow*B*H*C``).

The cheaper one is picked statically (rows first for the workloads below). The naive
order, which forms the product over every index at once, costs ``K*oh*ow*B*H*W*C`` (the
two-step form divides it by about ``min(oh, ow)``), and forming each box's image first
(``einsum('kb,bhwc->khwc')``) would materialise ``K`` copies of the map.

The one-hot over the batch costs a factor ``B`` in the first stage (every box is
contracted with every image, zero weight on the others): the price of selecting the
image without a gather or a data-indexed slice. It is not paid in the per-image form
(``boxes [B, R, 4]`` in the public API), which maps the op over the images with one image
per call: there ``B = 1``, the one-hot is ``[R, 1]`` and ``vmap`` turns both matmuls into
matmuls batched over the images, ``K*oh*H*W*C`` in the first stage. The intermediate ``T`` is
``K*oh*W*C`` values in the accumulation dtype, kept for the backward pass (float32:
0.5 GB for the box-head, 2 GB for the finest FPN level).

Contraction MACs per workload (``C = 256``, ``K = 1024``, ``B = 2``, rows first)::

    workload                       stage 1 (A' @ F)   stage 2 (T x Ax)   total MAC   GFLOP
    box-head  50x68, 7x7                 12.48 G            0.87 G         13.35 G     26.7
    mask-head 50x68, 14x14               24.96 G            3.49 G         28.45 G     56.9
    fpn 200x272..25x34, 7x7 (masked)    265.16 G            6.55 G        271.71 G    543.4
      per level: 200x272                199.65 G            3.49 G
                 100x136                 49.91 G            1.75 G
                  50x68                  12.48 G            0.87 G
                  25x34                   3.12 G            0.44 G

Per-image form (no factor B): box-head 6.24 G + 0.87 G = 7.11 G MAC (14.2 GFLOP),
mask-head 12.48 G + 3.49 G = 15.97 G, fpn 132.58 G + 6.55 G = 139.13 G (278.3 GFLOP).
(rois form, columns first would be 13.76 G for the box-head; the naive all-index product 87.3 G
box-head, 349.4 G mask-head.)

For comparison the gather path reads ``K*oh*ow*(2g)^2`` channel vectors: with
``sampling_ratio=2``, ``0.2 G`` MAC (box-head) and ``0.82 G`` (mask-head), but each read
is a gather, which a TPU executes slowly; the dense form spends about 65x (box-head) more
arithmetic on the matrix units instead (35x for the mask-head).
On a CPU this is simply slower: box-head, float32, 2 shared cores, jit, median of 5,
forward 1.4-2.9 s against 82-87 ms for the gather path with ``sampling_ratio=2``
(adaptive: 1.4-2.9 s against 0.35-0.62 s), ``jax.grad`` wrt features and boxes 3.7 s
against 1.7 s (adaptive: 3.5 s against 4.9 s); the per-image form (``vmap`` over the two
images, 512 boxes each) forward 0.79 s against 84 ms. The form is meant for the TPU.

Building the matrices costs ``2*K*bins*G*size`` compare-selects per axis (``G`` samples
per bin: ``sampling_ratio``, or in adaptive mode the window ``2*size + 6`` of
``sampling.window_size``): fixed ``g = 2`` box-head 1.4 M + 1.9 M, negligible; adaptive
box-head 76 M + 138 M (about 1.6% of the contraction's MACs, on the vector units), fpn
adaptive 4.4 G over the levels (1.6%).

Multi-level (FPN)
-----------------
Each box is sampled on its own level only: per level ``l`` the tap tables are built with
``live & (level_ids == l)``, so the matrices of boxes on other levels are zero, and the
level's contraction is ``K*oh*B*H_l*W_l*C``. Summed over the levels this is
``K*oh*B*C*sum_l H_l*W_l``, which for a pyramid whose areas shrink 4x per level is about
``4/3`` of the finest level alone (1.33x here: 265.2 G vs 199.6 G), not ``L`` times it.
What is wasted is the zero blocks: a box on a coarse level still pays for the finest
level. Avoiding that needs each level's boxes packed together: a sort or a grouping by
level (a gather), or a one-hot permutation matmul into a *static* per-level capacity,
which is only correct when the caller can bound how many boxes land on each level (with
capacity ``K`` on every level it gains nothing). Other layouts of the levels do not help
either: padding all levels to the finest width and stacking them along ``h`` costs
``B*sum_l H_l * W_0`` per box-row (102 000 vs 72 250 map cells here, 1.41x the masked
form), and packing the coarse levels beside the finest one in a ``200 x 408`` canvas
costs 81 600 cells (1.13x). The masked per-level form is the cheapest dense layout: its
cost is the total map area, the minimum for a contraction that reads every map cell.

Semantics and limits
--------------------
Values equal ``jax_roi.xla.roi_align(..., reduction="avg")`` to float rounding (the sum
order differs), for fixed and adaptive sampling, aligned and legacy boxes, RoIWarp
(``quantize=True``) and every edge box (dead boxes give zero rows and zero gradients).
16-bit features are accumulated in float32 (float64 stays float64), the result has the
features' dtype. The matmuls run at ``precision=HIGHEST`` by default so that float32
weights are not rounded to bfloat16 on TPU; ``lax.Precision.DEFAULT`` is faster there
and is within bfloat16 rounding for bfloat16 features. One difference from the gather
path: every box multiplies the whole map (with zero weights), so a non-finite feature
value anywhere in the batch makes every output non-finite (``0 * inf = nan``), where the
gather path only propagates it to the boxes whose samples read it.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax

from jax_roi.xla import sampling
from jax_roi.xla.contraction import accumulation_dtype

__all__ = ["contraction_macs", "interpolation_matrix", "multilevel_roi_align_matmul", "roi_align_matmul"]


def interpolation_matrix(taps: sampling.AxisTaps, size: int, dtype) -> jnp.ndarray:
    """``[K, bins, size]``: the summed weight of each map row (or column) over the samples
    of each bin, from one axis' tap tables (``normalize=True`` folds in the average).

    A one-hot comparison of the tap rows against an iota, times the weights, reduced over
    the ``G`` samples: elementwise work that XLA fuses into one reduction, and whose
    derivative flows to the weights only."""
    grid = lax.broadcasted_iota(jnp.int32, (1, 1, 1, size), 3)
    w_lo = taps.w_lo.astype(dtype)[..., None]
    w_hi = taps.w_hi.astype(dtype)[..., None]
    zero = jnp.zeros((), dtype)
    terms = jnp.where(taps.lo[..., None] == grid, w_lo, zero) + jnp.where(taps.hi[..., None] == grid, w_hi, zero)
    return jnp.sum(terms, axis=2)


def _image_onehot(batch, num_images, dtype):
    """``[K, B]``: 1 where the box reads that image (dead boxes already have zero weights)."""
    return (batch[:, None] == lax.broadcasted_iota(jnp.int32, (1, num_images), 1)).astype(dtype)


def _rows_first(bins_y, bins_x, num_images, height, width) -> bool:
    """Static choice of the contraction order, by MACs per box and channel."""
    rows_first = bins_y * num_images * height * width + bins_y * bins_x * width
    cols_first = bins_x * num_images * height * width + bins_y * bins_x * num_images * height
    return rows_first <= cols_first


def contraction_macs(num_images, height, width, channels, boxes, output_size) -> int:
    """Multiply-adds of the two-stage contraction on one map, in the order it runs."""
    oh, ow = output_size
    per = min(oh * num_images * height * width + oh * ow * width,
              ow * num_images * height * width + oh * ow * num_images * height)
    return boxes * channels * per


def _contract(features, a_y, a_x, onehot, acc, precision):
    """``out[k,p,q,c] = sum_{b,h,w} onehot[k,b] a_y[k,p,h] F[b,h,w,c] a_x[k,q,w]`` in ``acc``."""
    num_images, height, width, channels = features.shape
    k, oh, ow = a_y.shape[0], a_y.shape[1], a_x.shape[1]
    f = features.astype(acc)
    # A'[k, p, b, h]: the image selection folded into the row matrix.
    a_yb = (onehot[:, None, :, None] * a_y[:, :, None, :]).reshape(k, oh, num_images * height)
    dot = dict(precision=precision, preferred_element_type=acc)
    if _rows_first(oh, ow, num_images, height, width):
        t = lax.dot_general(a_yb.reshape(k * oh, num_images * height),
                            f.reshape(num_images * height, width * channels),
                            (((1,), (0,)), ((), ())), **dot)
        t = t.reshape(k, oh, width, channels)
        # batch k, contract w: [k, p, w, c] x [k, q, w] -> [k, p, c, q]
        out = lax.dot_general(t, a_x, (((2,), (2,)), ((0,), (0,))), **dot)
        return jnp.transpose(out, (0, 1, 3, 2))
    # columns first: U[k, q, (b, h), c] = a_x[k, q, w] F[b, h, w, c]
    fw = jnp.transpose(f, (2, 0, 1, 3)).reshape(width, num_images * height * channels)
    u = lax.dot_general(a_x.reshape(k * ow, width), fw, (((1,), (0,)), ((), ())), **dot)
    u = u.reshape(k, ow, num_images * height, channels)
    # batch k, contract (b, h): [k, p, bh] x [k, q, bh, c] -> [k, p, q, c]
    return lax.dot_general(a_yb, u, (((2,), (2,)), ((0,), (0,))), **dot)


def _matrices(rois, live, *, height, width, spatial_scale, output_size, sampling_ratio, aligned,
              quantize, acc):
    oh, ow = output_size
    common = dict(live=live, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
                  quantize=quantize, normalize=True)
    taps_y = sampling.axis_taps(rois[:, 2], rois[:, 4], bins=oh, size=height,
                                bound=sampling.window_size(sampling_ratio, height), **common)
    taps_x = sampling.axis_taps(rois[:, 1], rois[:, 3], bins=ow, size=width,
                                bound=sampling.window_size(sampling_ratio, width), **common)
    return interpolation_matrix(taps_y, height, acc), interpolation_matrix(taps_x, width, acc)


def roi_align_matmul(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                     quantize=False, precision=lax.Precision.HIGHEST):
    """Average RoIAlign (``quantize=True``: RoIWarp) without gathers, as two matmuls.

    Canonical form: ``features [B, H, W, C]``, ``rois [K, 5]`` = ``(batch, x1, y1, x2, y2)``
    in the coordinate dtype, ``output_size`` a static ``(oh, ow)``. Same meaning as
    ``jax_roi.xla.roi_align(..., reduction="avg")``. Returns ``[K, oh, ow, C]`` in the
    features' dtype."""
    oh, ow = output_size
    if quantize:
        aligned = False
    num_images, height, width, _ = features.shape
    acc = accumulation_dtype(features.dtype)
    batch, live = sampling.live_boxes(rois, num_images)
    a_y, a_x = _matrices(rois, live, height=height, width=width, spatial_scale=spatial_scale,
                         output_size=(oh, ow), sampling_ratio=sampling_ratio, aligned=aligned,
                         quantize=quantize, acc=acc)
    out = _contract(features, a_y, a_x, _image_onehot(batch, num_images, acc), acc, precision)
    return out.astype(features.dtype)


def multilevel_roi_align_matmul(levels: Sequence, rois, level_ids, output_size, *, spatial_scales,
                                sampling_ratio=-1, aligned=True, precision=lax.Precision.HIGHEST):
    """Average RoIAlign of each box on its own pyramid level, without gathers.

    ``levels``: ``[B, H_l, W_l, C]`` maps; ``level_ids [K]`` int: the level of each box (a
    box with an id outside ``[0, L)`` gives a zero row and no gradient); ``spatial_scales``
    one static scale per level. Same meaning as ``jax_roi.xla.multilevel_roi_align``.
    Returns ``[K, oh, ow, C]`` in the levels' dtype.

    Per level, the matrices of the boxes on other levels are zero (masked through the
    taps' ``live``), so the cost is the sum of the levels' contractions, about 4/3 of the
    finest level's for a 2x pyramid (module docstring)."""
    oh, ow = output_size
    if len(levels) != len(spatial_scales):
        raise ValueError(f"spatial_scales: expected one scale per level ({len(levels)} levels), "
                         f"got {len(spatial_scales)}")
    num_images = levels[0].shape[0]
    dtype = levels[0].dtype
    acc = accumulation_dtype(dtype)
    batch, live = sampling.live_boxes(rois, num_images)
    onehot = _image_onehot(batch, num_images, acc)
    level_ids = jnp.asarray(level_ids)
    out = None
    for l, (level, scale) in enumerate(zip(levels, spatial_scales)):
        _, height, width, _ = level.shape
        on_level = live & (level_ids == l)
        a_y, a_x = _matrices(rois, on_level, height=height, width=width, spatial_scale=scale,
                             output_size=(oh, ow), sampling_ratio=sampling_ratio, aligned=aligned,
                             quantize=False, acc=acc)
        part = _contract(level, a_y, a_x, onehot, acc, precision)
        out = part if out is None else out + part
    return out.astype(dtype)
