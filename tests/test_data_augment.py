"""Augmentation: Keras RandomFlip("horizontal") / RandomRotation semantics, ranges, identity."""

import math

import numpy as np
import pytest

from resdense_jax.data import augment


def _test_image(size=48):
  yy, xx = np.mgrid[0:size, 0:size]
  image = ((xx * 3 + yy * 2) % 200 + 30).astype(np.uint8)
  image[size // 4: size // 2, size // 5: size // 3] = 250  # An asymmetric bright block.
  return image


def test_angles_within_factor_and_spread():
  rng = np.random.default_rng(0)
  angles = np.array([augment.rotation_angle(rng, 0.2) for _ in range(4000)])
  limit = 0.2 * 2 * math.pi
  assert np.all(np.abs(angles) <= limit) and np.degrees(limit) == pytest.approx(72.0)
  assert angles.min() < -0.95 * limit and angles.max() > 0.95 * limit
  assert abs(angles.mean()) < 0.05


def test_zero_rotation_and_factor_zero_are_identity():
  image = _test_image()
  np.testing.assert_array_equal(augment.rotate(image, 0.0), image)
  rng = np.random.default_rng(1)
  outs = [augment.random_flip_and_rotate(image, rng, rotation_factor=0.0) for _ in range(20)]
  flipped = image[:, ::-1]
  assert all(np.array_equal(o, image) or np.array_equal(o, flipped) for o in outs)
  assert any(np.array_equal(o, flipped) for o in outs) and any(np.array_equal(o, image) for o in outs)


def test_full_turn_and_constant_fill():
  image = np.full((32, 32), 200, np.uint8)
  rotated = augment.rotate(image, math.pi / 4)
  assert rotated[0, 0] == 0 and rotated[16, 16] == 200  # Corners come from outside: filled 0.
  ring = _test_image(33)
  np.testing.assert_allclose(augment.rotate(ring, 2 * math.pi).astype(float), ring, atol=1)


@pytest.mark.parametrize("angle", [0.5, -1.1])
def test_rotation_matches_keras_random_rotation(angle):
  keras = pytest.importorskip("keras")
  image = _test_image()
  fraction = angle / (2 * math.pi)
  layer = keras.layers.RandomRotation((fraction, fraction), fill_mode="constant",
                                      interpolation="bilinear", fill_value=0.0)
  expected = np.asarray(layer(image[None, :, :, None].astype("float32"), training=True))[0, :, :, 0]
  ours = augment.rotate(image, angle).astype(float)
  interior = np.s_[6:-6, 6:-6]  # Border pixels differ in how each library samples the fill.
  assert np.abs(ours - expected)[interior].mean() < 1.5
  mirrored = augment.rotate(image, -angle).astype(float)  # The wrong direction is far off.
  assert np.abs(mirrored - expected)[interior].mean() > 10


def test_flip_matches_keras_random_flip_horizontal():
  keras = pytest.importorskip("keras")
  image = _test_image()
  layer = keras.layers.RandomFlip("horizontal", seed=0)
  batch = np.repeat(image[None, :, :, None], 64, axis=0).astype("float32")
  flipped = np.asarray(layer(batch, training=True))[..., 0]
  ours = augment.flip_horizontal(image).astype("float32")
  assert all(np.array_equal(f, image) or np.array_equal(f, ours) for f in flipped)
  assert any(np.array_equal(f, ours) for f in flipped)


def test_resize_and_grey_to_rgb():
  image = _test_image(64)
  small = augment.resize(image, 32)
  assert small.shape == (32, 32)
  np.testing.assert_allclose(small.astype(float), image.reshape(32, 2, 32, 2).mean((1, 3)), atol=1)
  rgb = augment.grey_to_rgb(small)
  assert rgb.shape == (32, 32, 3) and all(np.array_equal(rgb[..., c], small) for c in range(3))
