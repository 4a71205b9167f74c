"""A small two-stage detector's second stage: a Flax box head on a feature pyramid.

Synthetic RGB images hold coloured shapes (red squares, green discs, blue triangles, each
colour jittered) on a noisy background. A fixed, untrained conv backbone (random weights,
plus the image's own colour averaged down to each stride) gives an FPN of three levels
(strides 4, 8, 16). Proposals are ground-truth boxes jittered in position and size plus
random boxes; each is labelled with the class of the ground truth it overlaps (IoU >= 0.5)
or background. ``jax_roi.linen.MultiScaleRoIAlign`` pools each proposal from the level its
size picks, and two Dense layers feed a classifier (4 classes) and a box regressor (Faster
R-CNN deltas). It trains with optax (Adam) under ``jax.jit``, then reports accuracy and box
IoU on held-out images.

    python examples/detection_head.py                       # under a minute on 2 CPU cores
    python examples/detection_head.py --steps 50 --train-images 64 --test-images 16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import jax_roi.linen as roi_nn  # noqa: E402

CLASSES = ("background", "square", "disc", "triangle")
COLOURS = {1: (0.9, 0.25, 0.2), 2: (0.2, 0.75, 0.3), 3: (0.25, 0.4, 0.95)}
STRIDES = (4, 8, 16)
SPATIAL_SCALES = tuple(1 / s for s in STRIDES)
# The level rule for these small images: a 32-pixel box goes to level 3 (stride 8), 16 px
# and smaller to level 2, 64 px and larger to level 4.
CANONICAL_SCALE, CANONICAL_LEVEL = 32, 3
DELTA_SCALE = np.array([10.0, 10.0, 5.0, 5.0], np.float32)  # Faster R-CNN's target normalisation



def key(seed):
    """A PRNG key; the "rbg" generator compiles several times faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


# ----------------------------------------------------------------------------- data


def _shape_coverage(kind, box, xs, ys):
    """Antialiased coverage in [0, 1] of a shape filling ``box`` (x1, y1, x2, y2), pixel centres xs, ys."""
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if kind == 1:  # square
        d = np.maximum(np.abs(xs - cx) - hw, np.abs(ys - cy) - hh)
    elif kind == 2:  # disc (ellipse when the box is not square)
        r = min(hw, hh)
        d = np.hypot((xs - cx) * r / hw, (ys - cy) * r / hh) - r
    else:  # triangle, apex up
        d = ys - y2  # bottom edge
        for (ax, ay), (bx, by) in (((x1, y2), (cx, y1)), ((cx, y1), (x2, y2))):
            nx, ny = by - ay, ax - bx  # outward normal of edge a -> b (clockwise in image coordinates)
            n = math.hypot(nx, ny)
            d = np.maximum(d, ((xs - ax) * nx + (ys - ay) * ny) / n)
    return np.clip(0.5 - d, 0.0, 1.0)


def iou(a, b):
    """IoU of boxes ``a [..., 4]`` and ``b [..., 4]`` (broadcast)."""
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def make_images(rng, n, size, max_objects=3):
    """``images [n, size, size, 3]``, ``gt_boxes [n, max_objects, 4]``, ``gt_classes [n, max_objects]``
    (0: no object in that slot)."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    images = np.empty((n, size, size, 3), np.float32)
    gt_boxes = np.zeros((n, max_objects, 4), np.float32)
    gt_classes = np.zeros((n, max_objects), np.int32)
    for i in range(n):
        img = 0.45 + 0.06 * rng.standard_normal((size, size, 3))
        img += 0.1 * rng.uniform(-1, 1, 3)  # background tint
        placed = []
        for k in range(rng.integers(1, max_objects + 1)):
            for _ in range(20):  # a place that does not hide an earlier object
                w = rng.uniform(10, size * 0.45)
                h = w * rng.uniform(0.75, 1.33)
                x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
                box = np.array([x1, y1, x1 + w, y1 + h])
                if all(iou(box, p) < 0.2 for p in placed):
                    break
            else:
                continue
            cls = int(rng.integers(1, 4))
            colour = np.clip(np.array(COLOURS[cls]) + rng.uniform(-0.12, 0.12, 3), 0, 1)
            cover = _shape_coverage(cls, box, xs, ys)[..., None]
            img = img * (1 - cover) + colour * cover
            slot = len(placed)
            placed.append(box)
            gt_boxes[i, slot], gt_classes[i, slot] = box, cls
        images[i] = np.clip(img, 0, 1)
    return images, gt_boxes, gt_classes


def make_proposals(rng, gt_boxes, gt_classes, size, per_image=16, jitters=3):
    """Jittered ground truth (``jitters`` per object) and random boxes up to ``per_image``, with
    labels (class of the best-overlapping ground truth at IoU >= 0.5, else 0) and regression
    targets (normalised deltas to that ground truth; zero for background)."""
    n, m = gt_classes.shape
    boxes = np.zeros((n, per_image, 4), np.float32)
    for i in range(n):
        props = []
        for k in range(m):
            if gt_classes[i, k] == 0:
                continue
            x1, y1, x2, y2 = gt_boxes[i, k]
            w, h = x2 - x1, y2 - y1
            for _ in range(jitters):
                cx = (x1 + x2) / 2 + rng.normal(0, 0.12) * w
                cy = (y1 + y2) / 2 + rng.normal(0, 0.12) * h
                pw, ph = w * math.exp(rng.normal(0, 0.15)), h * math.exp(rng.normal(0, 0.15))
                props.append((cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2))
        while len(props) < per_image:
            w = rng.uniform(8, size * 0.5)
            h = w * rng.uniform(0.6, 1.6)
            x1, y1 = rng.uniform(-0.1 * size, size - 0.9 * w), rng.uniform(-0.1 * size, size - 0.9 * h)
            props.append((x1, y1, x1 + w, y1 + h))
        boxes[i] = np.asarray(props[:per_image], np.float32)
    overlaps = iou(boxes[:, :, None, :], gt_boxes[:, None, :, :])  # [n, R, m]
    overlaps = np.where(gt_classes[:, None, :] > 0, overlaps, 0.0)
    best = overlaps.argmax(-1)
    best_iou = np.take_along_axis(overlaps, best[..., None], -1)[..., 0]
    labels = np.where(best_iou >= 0.5, np.take_along_axis(gt_classes, best, 1), 0).astype(np.int32)
    matched = np.take_along_axis(gt_boxes, best[..., None].repeat(4, -1), 1)
    targets = encode(boxes, matched) * (labels > 0)[..., None]
    return boxes, labels, targets.astype(np.float32), matched


def encode(proposals, gt):
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    d = np.stack([((gt[..., 0] + gt[..., 2]) - (proposals[..., 0] + proposals[..., 2])) / 2 / pw,
                  ((gt[..., 1] + gt[..., 3]) - (proposals[..., 1] + proposals[..., 3])) / 2 / ph,
                  np.log(gw / pw), np.log(gh / ph)], -1)
    return d * DELTA_SCALE


def decode(proposals, deltas):
    d = deltas / DELTA_SCALE
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    cx = (proposals[..., 0] + proposals[..., 2]) / 2 + d[..., 0] * pw
    cy = (proposals[..., 1] + proposals[..., 3]) / 2 + d[..., 1] * ph
    w, h = pw * np.exp(d[..., 2]), ph * np.exp(d[..., 3])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


# ----------------------------------------------------------------------------- backbone


def _avg_pool(x, s):
    return nn.avg_pool(x, (s, s), strides=(s, s))


def backbone_params(key, width=13):
    """Random (He) weights of a fixed three-stage conv backbone; never trained."""
    ks = jax.random.split(key, 3)
    shapes = [(3, 3, 3, width), (3, 3, width, width), (3, 3, width, width)]
    return [jax.random.normal(k, s, jnp.float32) * math.sqrt(2.0 / (s[0] * s[1] * s[2])) for k, s in zip(ks, shapes)]


@jax.jit
def backbone(weights, images):
    """FPN levels at strides 4, 8, 16: ``[n, size/s, size/s, 3 + width]`` each: the image's colour
    averaged over the stride (hand-set channels) and a random conv stack's features."""
    x = _avg_pool(images, 2)
    levels = []
    for w, s in zip(weights, STRIDES):
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        levels.append(jnp.concatenate([_avg_pool(images, s) - 0.5, x], -1))
    return levels


def standardize(levels, stats=None):
    """Per-channel zero mean, unit variance (statistics of the training images)."""
    if stats is None:
        stats = [(lv.mean(axis=(0, 1, 2)), lv.std(axis=(0, 1, 2)) + 1e-6) for lv in levels]
    return [(lv - m) / s for lv, (m, s) in zip(levels, stats)], stats


# ----------------------------------------------------------------------------- model


class BoxHead(nn.Module):
    """Fast R-CNN's second stage on an FPN: MultiScaleRoIAlign, two Dense layers, a classifier
    and a class-agnostic box regressor."""

    num_classes: int = len(CLASSES)
    hidden: int = 128
    pool: int = 7
    implementation: str | None = None

    @nn.compact
    def __call__(self, levels, boxes):
        x = roi_nn.MultiScaleRoIAlign(self.pool, spatial_scales=SPATIAL_SCALES, sampling_ratio=2,
                                      canonical_scale=CANONICAL_SCALE, canonical_level=CANONICAL_LEVEL,
                                      implementation=self.implementation)(levels, boxes)
        x = x.reshape(x.shape[:-3] + (-1,))                      # [B, R, 7 * 7 * C]
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x), nn.Dense(4)(x)     # scores, deltas


def loss_fn(params, model, levels, boxes, labels, targets):
    scores, deltas = model.apply(params, levels, boxes)
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
    fg = (labels > 0).astype(jnp.float32)[..., None]
    box = (optax.huber_loss(deltas, targets, delta=1.0) * fg).sum() / jnp.maximum(fg.sum(), 1.0)
    return ce + box, (ce, box)


# ----------------------------------------------------------------------------- run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="image side, pixels (a multiple of 16)")
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--test-images", type=int, default=128)
    p.add_argument("--proposals", type=int, default=16, help="proposals per image")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", choices=("xla", "ffi"), default=None,
                   help="jax_roi path (default: the fastest built)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.size % 16:
        p.error("--size: expected a multiple of 16")

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n = args.train_images + args.test_images
    images, gt_boxes, gt_classes = make_images(rng, n, args.size)
    boxes, labels, targets, matched = make_proposals(rng, gt_boxes, gt_classes, args.size, args.proposals)
    levels = backbone(backbone_params(key(args.seed)), jnp.asarray(images, jnp.float32))
    train, test = slice(0, args.train_images), slice(args.train_images, n)
    train_levels, stats = standardize([lv[train] for lv in levels])
    test_levels, _ = standardize([lv[test] for lv in levels], stats)
    fg_share = (labels[train] > 0).mean()
    print(f"data: {n} images {args.size}x{args.size} ({args.train_images} train, {args.test_images} held out), "
          f"{args.proposals} proposals each ({fg_share:.0%} foreground); FPN "
          + ", ".join(f"{lv.shape[1]}x{lv.shape[2]}x{lv.shape[3]}" for lv in levels)
          + f"; {time.perf_counter() - t0:.1f}s")

    model = BoxHead(hidden=args.hidden, implementation=args.implementation)
    tr = dict(boxes=jnp.asarray(boxes[train]), labels=jnp.asarray(labels[train]), targets=jnp.asarray(targets[train]))
    params = jax.jit(model.init)(key(args.seed + 1), [lv[:1] for lv in train_levels], tr["boxes"][:1])
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, idx):
        batch = [jnp.take(lv, idx, axis=0) for lv in train_levels]
        (loss, (ce, box)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model, batch, tr["boxes"][idx], tr["labels"][idx], tr["targets"][idx])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, ce, box

    losses = []
    batch = min(args.batch, args.train_images)
    bar = tqdm(range(args.steps), desc="train", disable=args.no_progress, dynamic_ncols=True, mininterval=0.5)
    t1 = time.perf_counter()
    for step in bar:
        idx = jnp.asarray(rng.choice(args.train_images, batch, replace=False))
        params, opt_state, loss, ce, box = train_step(params, opt_state, idx)
        losses.append(float(loss))
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", cls=f"{float(ce):.3f}", box=f"{float(box):.3f}")
    train_s = time.perf_counter() - t1

    scores, deltas = jax.jit(model.apply)(params, test_levels, jnp.asarray(boxes[test]))
    pred = np.asarray(scores.argmax(-1))
    y = labels[test]
    accuracy = float((pred == y).mean())
    per_class = {CLASSES[c]: float((pred[y == c] == c).mean()) for c in range(len(CLASSES)) if (y == c).any()}
    fg = y > 0
    refined = decode(boxes[test], np.asarray(deltas))
    iou_before = float(iou(boxes[test][fg], matched[test][fg]).mean()) if fg.any() else float("nan")
    iou_after = float(iou(refined[fg], matched[test][fg]).mean()) if fg.any() else float("nan")
    k = max(1, min(20, len(losses) // 5))
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"train: {args.steps} steps of {batch} images x {args.proposals} proposals in {train_s:.1f}s; "
          f"loss {first:.3f} -> {last:.3f} (mean of the first / last {k} steps)")
    print(f"held out ({int(y.size)} proposals of {args.test_images} images): accuracy {accuracy:.1%}  ("
          + ", ".join(f"{c} {a:.0%}" for c, a in per_class.items()) + ")")
    print(f"held out foreground boxes: mean IoU with the ground truth {iou_before:.3f} (proposals) -> "
          f"{iou_after:.3f} (after the regressor)")
    return dict(losses=losses, first_loss=first, last_loss=last, accuracy=accuracy, per_class=per_class,
                iou_before=iou_before, iou_after=iou_after)


if __name__ == "__main__":
    main()
