"""The linen and nnx modules come from one table (jax_roi._module_spec): both sets have
exactly the functions' keyword arguments (plus output_size and dtype) as attributes, with
the functions' defaults."""

import dataclasses
import inspect

import pytest

import jax_roi
from jax_roi import _module_spec, linen, nnx

FUNCTIONS = {"RoIAlign": jax_roi.roi_align, "RoIWarp": jax_roi.roi_warp, "RoIPool": jax_roi.roi_pool,
             "MultiScaleRoIAlign": jax_roi.multiscale_roi_align, "PSRoIAlign": jax_roi.ps_roi_align,
             "PSRoIPool": jax_roi.ps_roi_pool, "RoIAlignRotated": jax_roi.roi_align_rotated}
KERNEL_OPS = {"RoIAlign", "RoIWarp", "RoIPool", "MultiScaleRoIAlign", "PSRoIAlign", "PSRoIPool", "RoIAlignRotated"}  # with `deterministic`


def _function_arguments(fn):
    """``{name: default}`` of every argument after ``features, boxes`` (``output_size``
    has none)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name: (_module_spec.REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params}


def _linen_attributes(cls):
    fields = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    return {f.name: (_module_spec.REQUIRED if f.default is dataclasses.MISSING else f.default) for f in fields}


def _nnx_attributes(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: (_module_spec.REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_modules_have_the_functions_keyword_arguments(name):
    expect = dict(_function_arguments(FUNCTIONS[name]), dtype=None)
    assert _module_spec.SPECS[name].function is FUNCTIONS[name]
    assert _linen_attributes(getattr(linen, name)) == expect
    assert _nnx_attributes(getattr(nnx, name)) == expect
    for module in (linen, nnx):
        assert ("deterministic" in getattr(module, name).__doc__) == (name in KERNEL_OPS)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_linen_and_nnx_store_the_same_values(name):
    kw = dict(spatial_scales=[0.5, 0.25]) if name == "MultiScaleRoIAlign" else {}
    if name in KERNEL_OPS:
        kw["deterministic"] = True
    a = getattr(linen, name)([2, 3], **kw)
    b = getattr(nnx, name)([2, 3], **kw)
    for attr in _nnx_attributes(getattr(nnx, name)):
        if attr in ("output_size", "spatial_scales"):
            assert tuple(getattr(a, attr)) == getattr(b, attr)
        else:
            assert getattr(a, attr) == getattr(b, attr), attr
    assert b.output_size == (2, 3) and getattr(b, "deterministic", True) is True
