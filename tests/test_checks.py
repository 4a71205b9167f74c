"""The opt-in checker catches each bad-value case under jit, and passes clean inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jax_roi

F = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 10, 3)), jnp.float32)
GOOD = np.array([[0, 1, 1, 6, 5], [1, 2, 0, 9, 7]], np.float32)


def _head(features, boxes, **kw):
    boxes = jax_roi.check_boxes(features, boxes, **kw)
    return jax_roi.roi_align(features, boxes, 2)


def _run(boxes, **kw):
    err, out = jax.jit(checkify.checkify(lambda f, b: _head(f, b, **kw)))(F, jnp.asarray(boxes))
    return err, out


def test_clean_boxes_pass_and_match_unchecked():
    err, out = _run(GOOD)
    err.throw()
    np.testing.assert_array_equal(out, jax_roi.roi_align(F, jnp.asarray(GOOD), 2))


@pytest.mark.parametrize("row, message", [
    ([0, np.nan, 1, 6, 5], "expected finite coordinates, got box 1"),
    ([0, 1, 1, np.inf, 5], "expected finite coordinates, got box 1"),
    ([0, -1e30, -1e30, 1e30, 1e30], "feature pixels of the 8x10 map"),
    ([2, 1, 1, 6, 5], "expected batch indices in [0, 2), got 2.0 at box 1"),
    ([-1, 1, 1, 6, 5], "expected batch indices in [0, 2), got -1.0 at box 1"),
    ([0.5, 1, 1, 6, 5], "expected batch indices in [0, 2), got 0.5 at box 1"),
])
def test_each_bad_case_is_caught(row, message):
    boxes = np.array([GOOD[0], row], np.float32)
    err, _ = _run(boxes)
    with pytest.raises(checkify.JaxRuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        err.throw()


def test_padding_allowed_on_request():
    boxes = np.array([GOOD[0], [-1, 1, 1, 6, 5]], np.float32)
    err, out = _run(boxes, allow_padding=True)
    err.throw()
    np.testing.assert_array_equal(out[1], 0)


def test_per_image_boxes_checked():
    boxes = jnp.asarray(np.array([[[1, 1, 6, 5]], [[1, 1, np.nan, 5]]], np.float32))
    err, _ = jax.jit(checkify.checkify(jax_roi.check_boxes))(F, boxes)
    with pytest.raises(checkify.JaxRuntimeError, match="finite coordinates, got box 1"):
        err.throw()
