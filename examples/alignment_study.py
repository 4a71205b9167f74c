"""The Mask R-CNN RoIAlign ablation (He et al. 2017, Table 2c and 6), in miniature.

The same tiny mask head is trained on features pooled by each RoI op: RoIPool (Fast R-CNN),
RoIWarp (MNC, max and average), RoIAlign (max and average, with ``aligned=False`` as in the
paper and ``aligned=True`` as Detectron2), at feature strides 8, 16 and 32.

Data: each synthetic image (``--size`` pixels, grey, a little noise) holds one shape (an
ellipse, a rectangle or a triangle, rotated, at a continuous, sub-pixel position). The feature
map is fixed, never trained: the image and seven fixed random 5x5 filter responses (ReLU),
averaged over ``stride x stride`` cells, i.e. the image downsampled by the stride. The
proposal is the shape's box jittered in position and size (as Mask R-CNN's mask branch
sees detector boxes, not ground truth); the target is the shape's exact binary mask on a
28x28 grid over the proposal. The head (nnx: two 3x3 convs, a 2x2 transposed conv, a 1x1
conv) maps the 14x14 pooled features to 28x28 mask logits. The features being fixed, each op
pools every proposal once and the head trains on the pooled tensors (the same thing as pooling
inside each step). Metric: mask IoU of the thresholded prediction with the target on held-out
shapes (mean, and the share above 0.5 and 0.75, an AP-like number).

    python examples/alignment_study.py --out docs/alignment_study.png     # a few minutes on 2 cores
    python examples/alignment_study.py --size 64 --train 64 --test 32 --steps 5 --out /tmp/a.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import jax_roi.nnx as roi_nnx  # noqa: E402

# label -> pooler factory (output_size, spatial_scale, **kw) -> nnx module
METHODS = {
    "RoIPool": lambda p, s, **kw: roi_nnx.RoIPool(p, spatial_scale=s, **kw),
    "RoIWarp max": lambda p, s, **kw: roi_nnx.RoIWarp(p, spatial_scale=s, sampling_ratio=2, reduction="max", **kw),
    "RoIWarp avg": lambda p, s, **kw: roi_nnx.RoIWarp(p, spatial_scale=s, sampling_ratio=2, reduction="avg", **kw),
    "RoIAlign max, aligned=False": lambda p, s, **kw: roi_nnx.RoIAlign(p, spatial_scale=s, sampling_ratio=2,
                                                                      reduction="max", aligned=False, **kw),
    "RoIAlign avg, aligned=False": lambda p, s, **kw: roi_nnx.RoIAlign(p, spatial_scale=s, sampling_ratio=2,
                                                                      reduction="avg", aligned=False, **kw),
    "RoIAlign max, aligned=True": lambda p, s, **kw: roi_nnx.RoIAlign(p, spatial_scale=s, sampling_ratio=2,
                                                                     reduction="max", aligned=True, **kw),
    "RoIAlign avg, aligned=True": lambda p, s, **kw: roi_nnx.RoIAlign(p, spatial_scale=s, sampling_ratio=2,
                                                                     reduction="avg", aligned=True, **kw),
}
POOL, MASK = 14, 28
CHANNELS = 8



def key(seed):
    """A PRNG key; the "rbg" generator compiles several times faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


# ----------------------------------------------------------------------------- shapes


def sample_shapes(rng, n, size):
    """Shape parameters: kind (0 ellipse, 1 rectangle, 2 triangle), centre, half size, aspect,
    angle; continuous positions."""
    r = rng.uniform(0.1, 0.26, n) * size
    margin = 1.3 * r
    return dict(kind=rng.integers(0, 3, n), cx=rng.uniform(margin, size - margin), cy=rng.uniform(margin, size - margin),
                r=r, aspect=rng.uniform(0.45, 1.0, n), angle=rng.uniform(0, np.pi, n))


def _local(shapes, i, xs, ys):
    c, s = math.cos(shapes["angle"][i]), math.sin(shapes["angle"][i])
    dx, dy = xs - shapes["cx"][i], ys - shapes["cy"][i]
    return c * dx + s * dy, -s * dx + c * dy


def _triangle(a, b):
    """Vertices (u, v) of the triangle with circumradius a, squashed to b along v."""
    return [(a * math.cos(t), b * math.sin(t)) for t in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]


def sdf(shapes, i, xs, ys):
    """Signed distance (approximate away from the edge, exact sign) of shape ``i`` at points xs, ys."""
    u, v = _local(shapes, i, xs, ys)
    a = shapes["r"][i]
    b = a * shapes["aspect"][i]
    kind = shapes["kind"][i]
    if kind == 0:
        return (np.hypot(u / a, v / b) - 1) * b
    if kind == 1:
        return np.maximum(np.abs(u) - a, np.abs(v) - b)
    verts = _triangle(a, b)
    d = -np.inf
    for (ux, vx), (uy, vy) in zip(verts, verts[1:] + verts[:1]):
        nu, nv = vy - vx, -(uy - ux)  # outward for counter-clockwise vertices
        norm = math.hypot(nu, nv)
        d = np.maximum(d, ((u - ux) * nu + (v - vx) * nv) / norm)
    return d


def bounding_box(shapes, i):
    a = shapes["r"][i]
    b = a * shapes["aspect"][i]
    c, s = math.cos(shapes["angle"][i]), math.sin(shapes["angle"][i])
    kind = shapes["kind"][i]
    if kind == 0:
        hw, hh = math.sqrt((a * c) ** 2 + (b * s) ** 2), math.sqrt((a * s) ** 2 + (b * c) ** 2)
        x0, x1, y0, y1 = -hw, hw, -hh, hh
    else:
        pts = [(a, b), (a, -b), (-a, b), (-a, -b)] if kind == 1 else _triangle(a, b)
        xs = [c * u - s * v for u, v in pts]
        ys = [s * u + c * v for u, v in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    cx, cy = shapes["cx"][i], shapes["cy"][i]
    return np.array([cx + x0, cy + y0, cx + x1, cy + y1])


def jitter(rng, box, shift=0.1, scale=0.1):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rng.normal(0, shift) * w, (y1 + y2) / 2 + rng.normal(0, shift) * h
    w, h = w * math.exp(rng.normal(0, scale)), h * math.exp(rng.normal(0, scale))
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def mask_target(shapes, i, box, m=MASK):
    """The exact binary mask of shape ``i`` on an m x m grid of cell centres over ``box``."""
    x1, y1, x2, y2 = box
    t = (np.arange(m) + 0.5) / m
    ys, xs = np.meshgrid(y1 + t * (y2 - y1), x1 + t * (x2 - x1), indexing="ij")
    return (sdf(shapes, i, xs, ys) < 0).astype(np.float32)


def render(shapes, idx, size, rng, noise=0.05):
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    out = np.empty((len(idx), size, size), np.float32)
    for j, i in enumerate(idx):
        out[j] = np.clip(0.5 - sdf(shapes, i, xs, ys), 0, 1)  # antialiased coverage
    return out + noise * rng.standard_normal(out.shape).astype(np.float32)


def filter_bank(key):
    w = jax.random.normal(key, (5, 5, 1, CHANNELS - 1), jnp.float32) / 5.0
    b = jnp.linspace(-0.3, 0.3, CHANNELS - 1, dtype=jnp.float32)
    return w, b


@jax.jit
def _responses(images, w, b):
    x = images[..., None]
    r = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.concatenate([x, jax.nn.relu(r + b)], -1)


def feature_maps(images, bank, strides):
    """{stride: [n, size/stride, size/stride, CHANNELS]}: the image and its filter responses,
    averaged over stride x stride cells."""
    r = _responses(jnp.asarray(images, jnp.float32), *bank)
    n, h, w, c = r.shape
    return {s: np.asarray(r.reshape(n, h // s, s, w // s, s, c).mean(axis=(2, 4))) for s in strides}


# ----------------------------------------------------------------------------- head


class MaskHead(nnx.Module):
    """Mask R-CNN's mask branch, tiny: 14x14 pooled features -> 28x28 mask logits."""

    def __init__(self, channels=CHANNELS, width=16, *, rngs):
        self.conv1 = nnx.Conv(channels, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.up = nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), rngs=rngs)
        self.out = nnx.Conv(width, 1, (1, 1), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.up(x))
        return self.out(x)[..., 0]


def make_trainer(lr, width):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MaskHead(width=width, rngs=nnx.Rngs(0))))
    opt = optax.adam(lr)

    @jax.jit
    def init(key):
        return nnx.state(MaskHead(width=width, rngs=nnx.Rngs(key)))

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, x):
        return nnx.merge(graphdef, params)(x) > 0

    return init, opt, step, predict


def mask_iou(pred, target):
    inter = (pred & target).sum(axis=(-2, -1))
    union = (pred | target).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------- run


def run(args, log=print):
    rng = np.random.default_rng(args.seed)
    n = args.train + args.test
    shapes = sample_shapes(rng, n, args.size)
    t0 = time.perf_counter()
    boxes = np.stack([jitter(rng, bounding_box(shapes, i), args.jitter, args.jitter) for i in range(n)]).astype(np.float32)
    targets = np.stack([mask_target(shapes, i, boxes[i]) for i in range(n)])
    bank = filter_bank(key(args.seed))
    feats = {s: [] for s in args.strides}
    for start in range(0, n, args.chunk):
        idx = np.arange(start, min(n, start + args.chunk))
        for s, f in feature_maps(render(shapes, idx, args.size, rng), bank, args.strides).items():
            feats[s].append(f)
    feats = {s: np.concatenate(v) for s, v in feats.items()}
    log(f"data: {n} shapes on {args.size}x{args.size} images ({args.train} train, {args.test} held out), "
        f"box sides {np.median(boxes[:, 2] - boxes[:, 0]):.0f} px median; feature maps "
        + ", ".join(f"stride {s}: {f.shape[1]}x{f.shape[2]}x{f.shape[3]}" for s, f in feats.items())
        + f"; {time.perf_counter() - t0:.1f}s")

    init, opt, step, predict = make_trainer(args.lr, args.width)
    train, test = slice(0, args.train), slice(args.train, n)
    y_train = jnp.asarray(targets[train])
    results = {}
    examples = {}
    for method in args.methods:
        for s in args.strides:
            t1 = time.perf_counter()
            pooler = METHODS[method](POOL, 1.0 / s, implementation=args.implementation)
            # one image per box: features [n, h, w, C] with boxes [n, 1, 4] (the per-image form)
            pooled = np.asarray(jax.jit(pooler)(jnp.asarray(feats[s]), jnp.asarray(boxes[:, None])))[:, 0]
            mean, std = pooled[train].mean(axis=(0, 1, 2)), pooled[train].std(axis=(0, 1, 2)) + 1e-6
            x = jnp.asarray((pooled - mean) / std)
            params = init(key(args.seed))  # the same initial head for every op
            opt_state = opt.init(params)
            brng = np.random.default_rng(args.seed + 1)  # the same batches for every op
            losses = []
            for _ in range(args.steps):
                b = jnp.asarray(brng.choice(args.train, min(args.batch, args.train), replace=False))
                params, opt_state, loss = step(params, opt_state, x[train][b], y_train[b])
                losses.append(float(loss))
            pred = np.concatenate([np.asarray(predict(params, x[test][i:i + 256]))
                                   for i in range(0, args.test, 256)])
            ious = mask_iou(pred, targets[test] > 0.5)
            results[method, s] = dict(miou=float(ious.mean()), iou50=float((ious >= 0.5).mean()),
                                      iou75=float((ious >= 0.75).mean()), first_loss=float(np.mean(losses[:5])),
                                      last_loss=float(np.mean(losses[-5:])))
            examples[method, s] = pred[: args.examples]
            log(f"  {method:<28} stride {s:>2}: mask IoU {ious.mean():.3f}  (loss {results[method, s]['first_loss']:.3f}"
                f" -> {results[method, s]['last_loss']:.3f}, {time.perf_counter() - t1:.1f}s)")
    return results, dict(shapes=shapes, boxes=boxes[test], targets=targets[test], preds=examples,
                         feats={s: f[test][: args.examples] for s, f in feats.items()}, size=args.size)


def format_table(results, methods, strides, key="miou", title="mask IoU"):
    head = f"{title:<30}" + "".join(f"{'stride ' + str(s):>11}" for s in strides)
    lines = [head, "-" * len(head)]
    for m in methods:
        lines.append(f"{m:<30}" + "".join(f"{results[m, s][key]:>11.3f}" for s in strides))
    if "RoIPool" in methods and "RoIAlign avg, aligned=True" in methods:
        lines.append(f"{'gain, RoIAlign avg (aligned)':<30}" + "".join(
            f"{results['RoIAlign avg, aligned=True', s][key] - results['RoIPool', s][key]:>+11.3f}" for s in strides))
        lines[-1] = lines[-1].replace("gain, RoIAlign avg (aligned)", "RoIAlign avg aligned - RoIPool")
    return "\n".join(lines)


def plot(path, results, methods, strides, data, n_examples):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(13, 8.8))
    gs = fig.add_gridspec(2, 1, height_ratios=[1.1, 1.0], hspace=0.25, top=0.92, bottom=0.03)
    top = gs[0].subgridspec(1, 2, wspace=0.22)
    styles = {"RoIPool": ("black", "s", "-"), "RoIWarp max": ("tab:orange", "v", "--"),
              "RoIWarp avg": ("tab:orange", "^", "-"), "RoIAlign max, aligned=False": ("tab:blue", "v", "--"),
              "RoIAlign avg, aligned=False": ("tab:blue", "^", "-"), "RoIAlign max, aligned=True": ("tab:green", "v", "--"),
              "RoIAlign avg, aligned=True": ("tab:green", "^", "-")}
    for k, (key, label) in enumerate((("miou", "mean mask IoU"), ("iou75", "share of masks with IoU >= 0.75"))):
        ax = fig.add_subplot(top[k])
        for m in methods:
            c, mk, ls = styles.get(m, ("grey", "o", "-"))
            ax.plot(range(len(strides)), [results[m, s][key] for s in strides], color=c, marker=mk, ls=ls, label=m)
        ax.set_xticks(range(len(strides)), [f"stride {s}" for s in strides])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if k == 1:
            ax.legend(fontsize=8, loc="lower left")
    fig.text(0.5, 0.965, "Mask head on features pooled by each RoI op (held-out synthetic shapes, 28x28 masks in "
             "jittered boxes)", ha="center", fontsize=11)
    # examples at the coarsest stride: the image in the proposal, the target, each op's mask
    s = max(strides)
    cols = ["RoIPool", "RoIWarp avg", "RoIAlign avg, aligned=False", "RoIAlign avg, aligned=True"]
    cols = [m for m in cols if m in methods] or list(methods)[:4]
    n_ex = min(n_examples, 4)
    bottom = gs[1].subgridspec(n_ex, 2 + len(cols), wspace=0.06, hspace=0.32)
    for r in range(n_ex):
        box = data["boxes"][r]
        f = data["feats"][s][r, ..., 0]
        panels = [("features (stride %d)" % s, None), ("target", data["targets"][r])] + \
                 [(m.replace(", aligned=", "\naligned="), data["preds"][m, s][r]) for m in cols]
        for c, (title, img) in enumerate(panels):
            ax = fig.add_subplot(bottom[r, c])
            if img is None:  # the stride-s map with the proposal box
                h, w = f.shape
                ax.imshow(f, cmap="Greys_r", extent=(0, w * s, h * s, 0), interpolation="nearest")
                ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec="red",
                                       lw=1.2))
                pad = 0.35 * (box[2] - box[0])
                ax.set_xlim(box[0] - pad, box[2] + pad)
                ax.set_ylim(box[3] + pad, box[1] - pad)
            else:
                ax.imshow(img, cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
                if c > 1:
                    iou = mask_iou(img[None].astype(bool), data["targets"][r][None] > 0.5)[0]
                    ax.set_xlabel(f"IoU {iou:.2f}", fontsize=7, labelpad=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=192, help="image side, pixels (a multiple of the largest stride)")
    p.add_argument("--train", type=int, default=2048, help="training shapes")
    p.add_argument("--test", type=int, default=512, help="held-out shapes")
    p.add_argument("--steps", type=int, default=300, help="training steps per (op, stride)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="channels of the mask head")
    p.add_argument("--jitter", type=float, default=0.1, help="proposal jitter (share of the box side, log-scale)")
    p.add_argument("--strides", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--examples", type=int, default=3, help="held-out examples drawn in the PNG")
    p.add_argument("--chunk", type=int, default=128, help="images rendered at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", choices=("xla", "ffi"), default=None,
                   help="jax_roi path (default: the fastest built)")
    p.add_argument("--out", default="alignment_study.png", help="PNG plot ('' for none)")
    args = p.parse_args(argv)
    if args.size % max(args.strides):
        p.error("--size: expected a multiple of every stride")

    t0 = time.perf_counter()
    results, data = run(args)
    print()
    print(format_table(results, args.methods, args.strides))
    print()
    print(format_table(results, args.methods, args.strides, key="iou75", title="share with mask IoU >= 0.75"))
    print(f"\n{len(args.methods)} ops x {len(args.strides)} strides, {args.steps} steps each, "
          f"{time.perf_counter() - t0:.0f}s")
    if args.out:
        plot(args.out, results, args.methods, args.strides, data, args.examples)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
