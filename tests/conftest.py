"""Shared test set-up: float64 on (it is a supported feature dtype), the implementations
built in this install, the torchvision golden data, and box sets with every edge case."""

import functools
import os

# The suite compiles many small programs and runs each once or twice, so most of its time
# is XLA's LLVM backend compiling them. The tests therefore ask for its cheap pipeline
# (backend optimization level 0), which cut the CPU time of tests/test_roi_pool.py by a third
# on the 2-core machine; the HLO passes (fusion, layout), which decide what is computed,
# are the same at every level. JAX_ROI_TEST_FAST_COMPILE=0 keeps XLA's default level;
# `.ci/run` runs its sanitizer, emulated-CUDA and Python 3.12 steps that way, so both are
# tested. The flags join any XLA_FLAGS already set (set before jax starts its backend).
FAST_COMPILE = os.environ.get("JAX_ROI_TEST_FAST_COMPILE", "1") != "0"
# What the bounded-time tests allow a compiled forward and backward on absurd boxes (work
# that is not bounded would take years): 1 s at XLA's default level; the cheap pipeline's
# code runs the pure-JAX max search about twice as slowly (1.1-1.4 s measured in CI).
BOUNDED_TIME_S = 3.0 if FAST_COMPILE else 1.0
if FAST_COMPILE:
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

# A compilation cache shared by the tests of one run and by its pytest-xdist workers: many
# tests compile the same computations (and the caches are dropped after each module). It
# lives in a fresh directory per run, removed at the end, so no executable outlives the
# build it came from. JAX_ROI_TEST_COMPILE_CACHE=DIR keeps one across runs instead, "0" turns
# it off.
_COMPILE_CACHE = os.environ.get("JAX_ROI_TEST_COMPILE_CACHE")
# The controller picks the run's id; pytest-xdist's workers inherit it through the environment.
_RUN_ID = os.environ.setdefault("JAX_ROI_TEST_RUN_ID", f"p{os.getpid()}")
_OWN_CACHE = not _COMPILE_CACHE
if _OWN_CACHE:
    import tempfile

    _COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"jax_roi_test_compile_cache_{_RUN_ID}")
if _COMPILE_CACHE != "0":
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a plain run)
        import shutil

        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "torchvision_golden.npz")


def built_implementations():
    from jax_roi import ffi

    return ["xla"] + (["ffi"] if jax.default_backend() in ffi.platforms() else [])


IMPLEMENTATIONS = built_implementations()


def rotated_implementations():
    """The built paths that take roi_align_rotated: pure JAX, and the kernels once this build
    has rotated ones (an op without kernels refuses ``implementation="ffi"``)."""
    import jax_roi

    paths = ["xla"]
    if "ffi" in IMPLEMENTATIONS:
        try:
            jax.eval_shape(lambda f, r: jax_roi.roi_align_rotated(f, r, 1, implementation="ffi"),
                           jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 6)))
        except (ValueError, NotImplementedError):
            pass
        else:
            paths.append("ffi")
    return paths


ROTATED_IMPLEMENTATIONS = rotated_implementations()


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param


@pytest.fixture(scope="session")
def golden_data():
    with np.load(GOLDEN_PATH) as z:
        return {k: z[k] for k in z.files}


# Tolerances per feature dtype: (atol, rtol) against the float64 oracle.
TOLERANCE = {
    np.dtype("float64"): (1e-10, 1e-10),
    np.dtype("float32"): (1e-5, 1e-5),
    np.dtype("float16"): (1e-2, 1e-2),
    np.dtype(jax.numpy.bfloat16): (3e-2, 2e-2),
}


def random_rois(rng, num_images, height, width, count, *, scale=1.0, edge=True):
    """``[count + edge cases, 5]`` rois in image pixels for a ``height x width`` map at
    ``scale``: boxes inside, crossing and leaving the map, and (``edge``) empty, inverted,
    sub-pixel, padding (-1), out-of-batch, NaN, inf and absurd (1e30) boxes."""
    img_h, img_w = height / scale, width / scale
    x1 = rng.uniform(-0.2 * img_w, 1.0 * img_w, count)
    y1 = rng.uniform(-0.2 * img_h, 1.0 * img_h, count)
    bw = rng.uniform(0.3, 0.8 * img_w, count)
    bh = rng.uniform(0.3, 0.8 * img_h, count)
    b = rng.integers(0, num_images, count)
    rois = [np.stack([b, x1, y1, x1 + bw, y1 + bh], axis=1)]
    if edge:
        cx, cy = 0.4 * img_w, 0.5 * img_h
        rois.append(np.array([
            [0, cx, cy, cx, cy],                      # empty
            [0, cx + 3, cy + 2, cx - 2, cy - 3],      # inverted
            [0, cx + 3, cy, cx - 2, cy + 4],          # one axis inverted
            [num_images - 1, cx, cy, cx + 0.3, cy + 0.2],  # sub-pixel
            [-1, 1, 1, 5, 5],                         # padding batch index
            [num_images, 1, 1, 5, 5],                 # batch index past the end
            [0, np.nan, 1, 5, 5],                     # NaN
            [0, 1, 1, np.inf, 5],                     # inf
            [0, -1e30, -1e30, 1e30, 1e30],            # absurd
            [0, -2 * img_w, -2 * img_h, -img_w, -img_h],  # entirely off the map
            [0, -0.5 * img_w, -0.5 * img_h, 1.5 * img_w, 1.5 * img_h],  # covers the map
        ]))
    return np.concatenate(rois).astype(np.float64)


# The padding, past-the-end, NaN and inf boxes above: all-zero rows and no gradient.
DEAD_ROWS = slice(-7, -3)


# Hypothesis profiles: "ci" (the default, fast) and "long" (`pytest --hypothesis-profile=long`).
try:
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   derandomize=False, print_blob=True)
    settings.register_profile("ci", max_examples=6, **_common)
    settings.register_profile("quick", max_examples=3, **_common)  # with -m "not slow"
    settings.register_profile("long", max_examples=400, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; the property tests skip without it
    pass


# --- Test speed and memory -----------------------------------------------------------------
def jit_static(fn):
    """``fn`` jit-compiled, every argument that is not an array (sizes, scales, options,
    lists of floats) static. Called eagerly, the pure-JAX path runs op by op and compiles
    every op and loop on its own, several times slower than one compile of the whole function;
    results are the same computation."""
    cache = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        mask = tuple(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
        static = tuple(leaf for leaf, m in zip(leaves, mask) if not m)
        key = (treedef, mask, static)
        try:
            compiled = cache.get(key)
        except TypeError:  # an unhashable option: no jit
            return fn(*args, **kwargs)
        if compiled is None:
            def inner(arrays):
                it_a, it_s = iter(arrays), iter(static)
                a, k = jax.tree.unflatten(treedef, [next(it_a) if m else next(it_s) for m in mask])
                return fn(*a, **k)
            compiled = cache[key] = jax.jit(inner)
        return compiled([leaf for leaf, m in zip(leaves, mask) if m])

    wrapper.__wrapped_eager__ = fn
    return wrapper


def output_and_feature_gradient(fn, features, cotangent):
    """``fn(features)`` and the gradient of ``sum(fn(features) * cotangent)`` in the
    features, from one compiled function (one compile, not one per direction)."""
    def both(f):
        out, pullback = jax.vjp(fn, f)
        return out, pullback(jnp.asarray(cotangent, out.dtype))[0]

    return jax.jit(both)(features)


# The canonical pure-JAX functions, jitted as a whole for the tests (tests call them, and the
# public ops with implementation="xla", eagerly all the time). JAX_ROI_TEST_EAGER=1 keeps
# them eager.
if os.environ.get("JAX_ROI_TEST_EAGER") != "1":
    import jax_roi.xla as _xla_path

    import jax_roi.xla.matmul as _matmul_form
    import jax_roi.xla.position_sensitive as _position_sensitive
    import jax_roi.xla.rotated as _rotated

    for _module, _names in ((_xla_path, ("roi_align", "roi_pool", "multilevel_roi_align")),
                            (_matmul_form, ("roi_align_matmul", "multilevel_roi_align_matmul")),
                            (_position_sensitive, ("ps_roi_align", "ps_roi_pool")),
                            (_rotated, ("roi_align_rotated",))):
        for _name in _names:
            _fn = getattr(_module, _name, None)
            if _fn is not None and not hasattr(_fn, "__wrapped_eager__"):
                setattr(_module, _name, jit_static(_fn))

@pytest.fixture(scope="module", autouse=True)
def _clear_jax_caches_after_module():
    """Compiled executables of one module are not reused by the next: dropping them keeps a
    whole-suite run's resident memory at what one module needs."""
    yield
    jax.clear_caches()


_DURATIONS_LOG = os.environ.get("JAX_ROI_TEST_DURATIONS")  # a path: one line per test, as it ends


def pytest_runtest_logreport(report):
    if _DURATIONS_LOG and report.when == "call":
        with open(_DURATIONS_LOG, "a") as fh:
            fh.write(f"{report.duration:9.2f} {report.outcome} {report.nodeid}\n")


# --- The quick subset: pytest -m "not slow" ------------------------------------------------
# Whole tests that are slow by nature (training runs, subprocesses with simulated devices,
# thread pools): their module and test name.
SLOW_TESTS = {
    ("test_examples.py", "test_detection_head"),
    ("test_examples.py", "test_alignment_study"),
    ("test_sharding.py", "test_sharded_head_example"),
    ("test_concurrency.py", "test_threads_match_serial"),
    ("test_cli.py", "test_demo_draws_the_picture"),
    ("test_examples.py", "test_sampling_picture"),
    # the slowest of the rest (measured with JAX_ROI_TEST_DURATIONS); other tests cover
    # the same ops and paths in the quick subset
    ("test_ffi.py", "test_baseline_simd_variant_matches"),
    ("test_ffi.py", "test_align_many_rois_and_channels_f32"),
    ("test_ffi_transforms.py", "test_jit_checkpoint_scan_compose"),
    ("test_pyramid.py", "test_gradients_equal_per_level_roi_align"),
    ("test_pyramid.py", "test_torchvision_golden"),
    ("test_pyramid.py", "test_box_forms_and_layouts"),
}
# Parametrized tests in these modules keep their first parametrization per implementation in
# the quick subset (so every op, option family and path is still exercised: each test
# function runs at least once on each built path); the other parametrizations are slow.
SAMPLED_MODULES = {"test_ffi.py", "test_ffi_transforms.py", "test_reference.py", "test_roi_align.py",
                   "test_roi_pool.py", "test_pyramid.py", "test_cuda_lowering.py", "test_properties.py"}


def _group_key(item):
    callspec = getattr(item, "callspec", None)
    impl = callspec.params.get("implementation") if callspec is not None else None
    return (item.path.name, item.originalname, impl)


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        module = item.path.name
        if (module, item.originalname) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
            continue
        if module in SAMPLED_MODULES and getattr(item, "callspec", None) is not None:
            key = _group_key(item)
            if key in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(key)


def pytest_configure(config):
    # The quick subset draws fewer Hypothesis examples (unless a profile is asked for).
    if "not slow" in (config.getoption("markexpr", "") or "") and "HYPOTHESIS_PROFILE" not in os.environ \
            and not config.getoption("hypothesis_profile", None):
        try:
            from hypothesis import settings as _settings
            _settings.load_profile("quick")
        except ImportError:
            pass


def timed_forward_backward(fwd, bwd, *args):
    """Compiles ``fwd`` and ``bwd``, then runs both three times; returns the best time
    (the machine may be shared), the forward's output and the backward's gradients."""
    import time

    jax.block_until_ready((fwd(*args), bwd(*args)))  # compile
    elapsed = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(*args))
        grads = jax.block_until_ready(bwd(*args))
        elapsed.append(time.perf_counter() - t0)
    return min(elapsed), out, grads
