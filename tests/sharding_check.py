"""Run in a fresh process with 8 simulated CPU devices (tests/test_sharding.py starts it):
jit with the batch axis of features and boxes sharded over the devices must compute each
shard locally, with no all-gather or all-to-all, forward and grad, and equal the unsharded
result. Prints one JSON line per case."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU ones, on a GPU machine too

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_roi  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute")


def main(implementation):
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, 16, 20, 4)).astype(np.float32)
    boxes = rng.uniform(0, 14, (8, 6, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    levels = [feats, feats[:, ::2, ::2]]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    ops = {
        "roi_align_avg": lambda f, b: jax_roi.roi_align(f, b, 3, sampling_ratio=2, implementation=implementation),
        "roi_align_adaptive_max": lambda f, b: jax_roi.roi_align(f, b, 3, reduction="max",
                                                                 implementation=implementation),
        "roi_pool": lambda f, b: jax_roi.roi_pool(f, b, 3, implementation=implementation),
        "multiscale": lambda f, b: jax_roi.multiscale_roi_align(
            [f, f[:, ::2, ::2]], b, 3, spatial_scales=[1.0, 0.5], canonical_scale=8, canonical_level=0,
            sampling_ratio=2, implementation=implementation),
    }
    del levels
    for name, op in ops.items():
        def loss(f, b, op=op):
            return jnp.sum(op(f, b) ** 2)

        for label, fn in (("forward", op), ("grad", jax.grad(loss, argnums=(0, 1)))):
            jitted = jax.jit(fn, in_shardings=(shard, shard))
            f_s, b_s = jax.device_put(feats, shard), jax.device_put(boxes, shard)
            text = jitted.lower(f_s, b_s).compile().as_text()
            counts = {c: text.count(c + "(") + text.count(c + "-start(") for c in COLLECTIVES}
            sharded = jax.tree_util.tree_leaves(jitted(f_s, b_s))
            plain = jax.tree_util.tree_leaves(jax.jit(fn)(feats, boxes))
            err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0)) for a, b in zip(sharded, plain))
            print(json.dumps(dict(op=name, what=label, collectives=counts, max_abs_diff=err)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
