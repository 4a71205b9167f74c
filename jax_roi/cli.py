"""``python -m jax_roi [demo|bench|info]``.

* ``demo`` (the default): which paths are built, the seed documents' worked examples
  computed by every built path, a timing of the paths on the box-head workload, and the
  sampling picture.
* ``bench``: the benchmark workloads of BENCHMARKS.md (see ``jax_roi.bench``).
* ``info``: which implementations are built, for which platforms.
"""

from __future__ import annotations

import sys
import time

import numpy as np

# The seed document's 8x8 RoIPool map (x is the column, y the row).
POOL_EXAMPLE_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
], np.float32)


def implementations() -> dict[str, list[str]]:
    """``{"xla": [platforms], "ffi": [platforms]}`` for this install."""
    from jax_roi import ffi

    return {"xla": ["cpu", "cuda", "rocm", "tpu"], "ffi": list(ffi.platforms())}


def info() -> int:
    import jax

    import jax_roi

    print(f"jax_roi {jax_roi.__version__}  jax {jax.__version__}  default backend: {jax.default_backend()}")
    for name, plats in implementations().items():
        print(f"  {name:<4} {'built for ' + ', '.join(plats) if plats else 'not built'}")
    return 0


def _paths():
    return ["xla"] + (["ffi"] if implementations()["ffi"] else [])


def worked_examples() -> int:
    import jax.numpy as jnp

    import jax_roi

    feats = jnp.asarray(POOL_EXAMPLE_MAP)[None, :, :, None]
    print("RoIPool, the 8x8 map of the seed document, 2x2 output:")
    for binning, box, expect in (("floor", (0, 3, 7, 8), [[0.85, 0.84], [0.97, 0.96]]),
                                 ("caffe", (0, 3, 6, 7), [[0.85, 0.96], [0.97, 0.96]])):
        for path in _paths():
            out = jax_roi.roi_pool(feats, jnp.asarray([[0, *box]], jnp.float32), 2, binning=binning,
                                   implementation=path)[0, :, :, 0]
            print(f"  binning={binning:<5} box={box} [{path:<3}] -> {np.asarray(out).astype(float).round(2).tolist()}"
                  f"   (expected {expect})")
    ramp = jnp.asarray(np.add.outer(10 * np.arange(5.0), np.arange(5.0)), jnp.float32)[None, :, :, None]
    print("RoIAlign, ramp map f[y, x] = 10*y + x (5x5), box (1, 1, 3, 3), 4x4 output, sampling_ratio=2, first row:")
    for aligned, expect in ((True, [8.25, 8.75, 9.25, 9.75]), (False, [13.75, 14.25, 14.75, 15.25])):
        for path in _paths():
            out = jax_roi.roi_align(ramp, jnp.asarray([[0, 1, 1, 3, 3]], jnp.float32), 4, sampling_ratio=2,
                                    aligned=aligned, implementation=path)[0, 0, :, 0]
            print(f"  aligned={aligned!s:<5} [{path:<3}] -> {np.asarray(out).tolist()}   (expected {expect})")
    return 0


def quick_timing(repeats: int = 5) -> None:
    import jax
    import jax.numpy as jnp

    import jax_roi
    from jax_roi.bench import WORKLOADS, make_inputs

    w = WORKLOADS["box-head"]
    feats, rois = make_inputs("box-head")
    x, r = jnp.asarray(feats[0]), jnp.asarray(rois)
    print(f"box-head roi_align (B=2, 50x68x256, K={r.shape[0]}, 7x7, sampling 2), median of {repeats}:")
    for path in _paths():
        def f(x, r, path=path):
            return jax_roi.roi_align(x, r, w["output"], spatial_scale=w["scales"][0],
                                     sampling_ratio=w["sampling_ratio"], implementation=path)
        for label, fn in (("fwd", jax.jit(f)), ("fwd+bwd", jax.jit(jax.grad(lambda x, r: f(x, r).sum())))):
            jax.block_until_ready(fn(x, r))
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, r))
                ts.append((time.perf_counter() - t0) * 1e3)
            print(f"  {path:<3} {label:<8} {np.median(ts):8.2f} ms")


def demo(picture: str = "sampling_picture.png") -> int:
    info()
    print()
    worked_examples()
    print()
    quick_timing()
    print()
    try:
        from jax_roi.figures import draw_sampling_picture
    except ImportError as err:  # matplotlib missing: the rest of the demo still stands
        print(f"sampling picture skipped ({err})")
        return 0
    draw_sampling_picture(picture)
    print(f"wrote {picture}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "bench":
        from jax_roi import bench
        return bench.main(argv)
    if command == "info":
        return info()
    if command == "demo":
        import argparse
        parser = argparse.ArgumentParser(prog="python -m jax_roi demo")
        parser.add_argument("--picture", default="sampling_picture.png")
        return demo(parser.parse_args(argv).picture)
    print(f"command: expected one of demo, bench, info, got {command!r}", file=sys.stderr)
    return 2
