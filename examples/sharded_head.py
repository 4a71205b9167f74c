"""A box head trained data-parallel over every local device, with jax_roi under jit.

The images of a batch (features [B, H, W, C] and boxes [B, R, 4]) are split over a 1-D
device mesh along B; parameters are replicated. jax_roi keeps the per-image form a batch
computation (the pure-JAX path maps over images; the kernel path partitions its custom
call along images), so every device pools its own images and the compiled step has no
all-gather of the features: the only collectives are the gradient all-reduces that any
data-parallel step has. The script prints that count from the compiled HLO.

Run on CPU with simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_head.py

Multi-host: start one process per host with ``jax.distributed.initialize(coordinator,
num_processes, process_id)`` before anything else touches JAX; ``jax.devices()`` then lists
the devices of every host and the same mesh, sharding and jitted step work unchanged, each
process feeding its own slice of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_roi


def make_batch(rng, images, size, boxes_per_image, channels):
    """Features of a stride-4 map where box k of an image carries class k % 3 as a bump."""
    h = w = size // 4
    feats = 0.1 * rng.standard_normal((images, h, w, channels)).astype(np.float32)
    boxes = np.zeros((images, boxes_per_image, 4), np.float32)
    labels = rng.integers(0, 3, (images, boxes_per_image))
    for b in range(images):
        for r in range(boxes_per_image):
            x0, y0 = rng.uniform(0, size * 0.7, 2)
            s = rng.uniform(size * 0.1, size * 0.3)
            boxes[b, r] = (x0, y0, x0 + s, y0 + s)
            ys, xs = int((y0 + s / 2) / 4), int((x0 + s / 2) / 4)
            feats[b, ys:ys + 2, xs:xs + 2, labels[b, r]] += 1.0
    return feats, boxes, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images-per-device", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--implementation", default=None, choices=[None, "xla", "ffi"])
    args = parser.parse_args(argv)

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    images = args.images_per_device * len(devices)
    rng = np.random.default_rng(0)

    def head(params, feats, boxes):
        x = jax_roi.roi_align(feats, boxes, 4, spatial_scale=0.25, sampling_ratio=2,
                              implementation=args.implementation)  # [B, R, 4, 4, C]
        x = x.reshape(x.shape[:2] + (-1,))
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    def loss_fn(params, feats, boxes, labels):
        logits = head(params, feats, boxes)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": 0.1 * jax.random.normal(k1, (16 * args.channels, 32)),
              "w2": 0.1 * jax.random.normal(k2, (32, 3))}
    opt = optax.adam(3e-2)
    params = jax.device_put(params, replicated)
    state = jax.device_put(opt.init(params), replicated)

    @jax.jit
    def step(params, state, feats, boxes, labels):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, feats, boxes, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    def batch():
        f, b, l = make_batch(rng, images, args.size, args.boxes, args.channels)
        return jax.device_put(f, data), jax.device_put(b, data), jax.device_put(l, data)

    f, b, l = batch()
    hlo = step.lower(params, state, f, b, l).compile().as_text()
    gathers = hlo.count("all-gather(") + hlo.count("all-gather-start(")
    reduces = hlo.count("all-reduce(") + hlo.count("all-reduce-start(")
    print(f"{len(devices)} devices, {images} images of {args.boxes} boxes per step; compiled step: "
          f"{gathers} all-gathers, {reduces} all-reduces (gradients)")
    losses, accs = [], []
    t0 = time.perf_counter()
    for i in range(args.steps):
        f, b, l = batch()
        params, state, loss, acc = step(params, state, f, b, l)
        losses.append(float(loss))
        accs.append(float(acc))
        if (i + 1) % max(1, args.steps // 5) == 0:
            print(f"step {i + 1:4d}  loss {np.mean(losses[-10:]):.3f}  accuracy {np.mean(accs[-10:]):.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s; output sharding: {loss.sharding}")
    return dict(devices=len(devices), all_gathers=gathers, losses=losses, accuracies=accs)


if __name__ == "__main__":
    main()
