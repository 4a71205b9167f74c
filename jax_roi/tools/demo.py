"""``python -m jax_roi demo`` (the default command): what this install can do, in one run.

1. what is built and which path each platform uses (as ``info``);
2. the worked examples of ``docs/semantics.md`` computed by every built path, next to the
   expected numbers;
3. a timing of the paths on the box-head benchmark workload (forward and forward + backward);
4. the sampling picture ``sampling_picture.png`` (needs matplotlib: without it the demo says
   so, tells how to add it, and still exits 0).
"""

from __future__ import annotations

import time

import numpy as np

# The 8x8 map of the RoIPool worked example (docs/semantics.md); row index y, column index x.
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

INSTALL_MATPLOTLIB = "pip install matplotlib   (or: pip install \".[examples]\" from a checkout)"


def built_paths() -> list[str]:
    """The paths that run on the default platform: ``xla`` always, ``ffi`` where built."""
    import jax

    from jax_roi import ffi

    return ["xla"] + (["ffi"] if jax.default_backend() in ffi.platforms() else [])


def worked_examples() -> bool:
    """Prints the worked examples on every built path; True when all match."""
    import jax.numpy as jnp

    import jax_roi

    ok = True
    feats = jnp.asarray(POOL_EXAMPLE_MAP)[None, :, :, None]
    print("RoIPool on the 8x8 example map, 2x2 output:")
    for binning, box, expect in (("floor", (0, 3, 7, 8), [[0.85, 0.84], [0.97, 0.96]]),
                                 ("caffe", (0, 3, 6, 7), [[0.85, 0.96], [0.97, 0.96]])):
        for path in built_paths():
            out = jax_roi.roi_pool(feats, jnp.asarray([[0, *box]], jnp.float32), 2, binning=binning,
                                   implementation=path)[0, :, :, 0]
            got = np.asarray(out).astype(float).round(2).tolist()
            ok &= bool(np.allclose(got, expect))
            print(f"  binning={binning:<5} box={box} [{path:<3}] -> {got}   (expected {expect})")
    ramp = jnp.asarray(np.add.outer(10 * np.arange(5.0), np.arange(5.0)), jnp.float32)[None, :, :, None]
    print("RoIAlign on the ramp map f[y, x] = 10*y + x (5x5), box (1, 1, 3, 3), 4x4 output, "
          "sampling_ratio=2, first row:")
    for aligned, expect in ((True, [8.25, 8.75, 9.25, 9.75]), (False, [13.75, 14.25, 14.75, 15.25])):
        for path in built_paths():
            out = jax_roi.roi_align(ramp, jnp.asarray([[0, 1, 1, 3, 3]], jnp.float32), 4, sampling_ratio=2,
                                    aligned=aligned, implementation=path)[0, 0, :, 0]
            got = np.asarray(out).tolist()
            ok &= bool(np.allclose(got, expect, atol=1e-5))
            print(f"  aligned={aligned!s:<5} [{path:<3}] -> {got}   (expected {expect})")
    return ok


def quick_timing(repeats: int = 5) -> None:
    """Box-head workload (``docs/benchmarks.md``), every built path, medians of ``repeats``."""
    import jax
    import jax.numpy as jnp

    import jax_roi
    from jax_roi.tools.bench import WORKLOADS, make_inputs

    w = WORKLOADS["box-head"]
    feats, rois = make_inputs("box-head")
    x, r = jnp.asarray(feats[0]), jnp.asarray(rois)
    print(f"box-head roi_align (B=2, 50x68x256, K={r.shape[0]}, 7x7, sampling_ratio=2), "
          f"jit-compiled, median of {repeats} after warm-up:")
    for path in built_paths():
        def f(x, r, path=path):
            return jax_roi.roi_align(x, r, w["output"], spatial_scale=w["scales"][0],
                                     sampling_ratio=w["sampling_ratio"], implementation=path)
        for label, fn in (("fwd", jax.jit(f)), ("fwd+bwd", jax.jit(jax.grad(lambda x, r: f(x, r).sum())))):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, r))
            first = (time.perf_counter() - t0) * 1e3
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, r))
                ts.append((time.perf_counter() - t0) * 1e3)
            print(f"  {path:<3} {label:<8} {np.median(ts):8.2f} ms   (first call, with compile: {first:7.0f} ms)",
                  flush=True)


def sampling_picture(path: str) -> bool:
    """Draws the sampling picture at ``path``; False (with a message) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"sampling picture skipped: matplotlib is not installed. To get it: {INSTALL_MATPLOTLIB}")
        return False
    from jax_roi.tools.figures import draw_sampling_picture

    draw_sampling_picture(path)
    print(f"wrote {path} (where roi_pool, roi_warp and roi_align read the map; checked against the library)")
    return True


def demo(picture: str = "sampling_picture.png", *, timing: bool = True, repeats: int = 5) -> int:
    from jax_roi.tools.cli import info

    steps = 4 if timing else 3
    step = iter(range(1, steps + 1))
    print(f"[{next(step)}/{steps}] what is built", flush=True)
    info()
    print(f"\n[{next(step)}/{steps}] worked examples", flush=True)
    ok = worked_examples()
    if timing:
        print(f"\n[{next(step)}/{steps}] timing (compiles first: a few seconds per path)", flush=True)
        quick_timing(repeats)
    print(f"\n[{next(step)}/{steps}] sampling picture", flush=True)
    sampling_picture(picture)
    if not ok:
        print("a worked example did not match its expected value", flush=True)
        return 1
    return 0
