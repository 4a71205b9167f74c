"""The attribute limits the kernels enforce, as the compiled module exports them."""

import importlib

import pytest


def test_extension_exports_its_limits():
    try:
        ext = importlib.import_module("jax_roi._ext")
    except ImportError:
        pytest.skip("the FFI kernels are not built")
    assert ext.limits["max_sampling_ratio"] == 1024
    assert ext.limits["max_levels"] == 32
    assert ext.limits["max_deterministic_rois"] == 2**31 - 1
