"""Augmentation ops against NumPy/PIL/SciPy references or exact properties."""

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import tensorflow as tf

from medvl_jax.data import augment

CFG = dict(
  crop_scale=(0.6, 1.0),
  flip_p=0.5,
  rotation=20.0,
  translate=0.1,
  affine_scale=(0.95, 1.05),
  brightness=(0.6, 1.4),
  contrast=(0.6, 1.4),
  blur_sigma=(0.1, 3.0),
)


def seed(i: int, j: int = 0) -> tf.Tensor:
  return tf.constant([i, j], tf.int64)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
  return np.random.default_rng(0).uniform(0, 255, (48, 40, 1)).astype(np.float32)


def test_flip_is_fliplr_or_identity_and_fires_half_the_time(noise):
  flip = tf.function(augment.random_flip)
  fired = 0
  for i in range(200):
    out = flip(noise, seed(i)).numpy()
    if np.array_equal(out, np.fliplr(noise)):
      fired += 1
    else:
      np.testing.assert_array_equal(out, noise)
  assert 70 <= fired <= 130  # Binomial(200, 0.5): mean 100, sd ~7.
  image = noise.astype(np.uint8)
  assert augment.random_flip(image, seed(1), p=1.0).dtype == tf.uint8
  np.testing.assert_array_equal(augment.random_flip(image, seed(1), p=1.0), np.fliplr(image))
  np.testing.assert_array_equal(augment.random_flip(image, seed(1), p=0.0), image)


def test_resize_shorter_side_like_torchvision():
  image = np.zeros((300, 500, 1), np.uint8)
  assert augment.resize_shorter_side(image, 256).shape == (256, 426, 1)
  assert augment.resize_shorter_side(image.transpose(1, 0, 2), 256).shape == (426, 256, 1)
  same = np.random.default_rng(1).uniform(0, 255, (256, 300, 1)).astype(np.float32)
  np.testing.assert_array_equal(augment.resize_shorter_side(same, 256), same)


def test_crop_window_respects_scale_ratio_and_bounds():
  for i in range(50):
    y, x, h, w = augment.sample_crop_window(256, 300, seed(i)).numpy()
    assert 0 <= y and y + h <= 256 and 0 <= x and x + w <= 300
    assert 0.6 - 0.02 <= h * w / (256 * 300) <= 1.0
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  # No draw can fit: torchvision's fallback, the whole image (its ratio is within range).
  window = augment.sample_crop_window(256, 300, seed(0), scale=(2.0, 2.0)).numpy()
  np.testing.assert_array_equal(window, [0, 0, 256, 300])


def test_crop_is_a_resized_sub_window():
  rows, cols = np.mgrid[0:256, 0:300].astype(np.float32)
  gradient = (0.7 * rows + 0.3 * cols)[..., None]
  noise = np.random.default_rng(2).uniform(0, 255, (256, 300)).astype(np.float32)
  for i in range(5):
    y, x, h, w = augment.sample_crop_window(256, 300, seed(i)).numpy()
    # A ramp stays a ramp: output pixel centres map back into the window (the antialias
    # tent kernel reproduces a linear function up to ~0.01 px when downscaling).
    out = augment.random_resized_crop(gradient, seed(i), size=64, resize=256).numpy()
    assert out.shape == (64, 64, 1) and out.dtype == np.float32
    centres = (np.arange(64) + 0.5) / 64
    expected = 0.7 * (y - 0.5 + centres * h)[:, None] + 0.3 * (x - 0.5 + centres * w)[None]
    np.testing.assert_allclose(out[4:-4, 4:-4, 0], expected[4:-4, 4:-4], atol=0.05)
    # Same as PIL's (antialiased) bilinear resize of that box, away from the border.
    out = augment.random_resized_crop(noise[..., None], seed(i), size=64).numpy()[..., 0]
    pil = np.asarray(
      Image.fromarray(noise, mode="F").resize((64, 64), Image.BILINEAR, box=(x, y, x + w, y + h))
    )
    np.testing.assert_allclose(out[4:-4, 4:-4], pil[4:-4, 4:-4], atol=1e-2)


def test_affine_identity_rotation_and_translation(noise):
  np.testing.assert_array_equal(augment.affine_transform(noise, 0.0, (0.0, 0.0), 1.0), noise)
  np.testing.assert_array_equal(
    augment.random_affine(noise, seed(3), degrees=0.0, translate=0.0, scale=(1.0, 1.0)), noise
  )
  square = noise[:40]
  np.testing.assert_allclose(
    augment.affine_transform(square, 90.0, (0.0, 0.0), 1.0), np.rot90(square), atol=1e-2
  )
  np.testing.assert_allclose(
    augment.affine_transform(square, -90.0, (0.0, 0.0), 1.0), np.rot90(square, k=-1), atol=1e-2
  )
  shifted = np.zeros_like(noise)  # 3 px right, 2 px up, zero fill.
  shifted[:-2, 3:] = noise[2:, :-3]
  np.testing.assert_array_equal(augment.affine_transform(noise, 0.0, (3.0, -2.0), 1.0), shifted)


def test_affine_scale_about_centre():
  rows, cols = np.mgrid[0:33, 0:33].astype(np.float32)
  ramp = (rows + 2 * cols)[..., None]
  out = augment.affine_transform(ramp, 0.0, (0.0, 0.0), 2.0).numpy()
  # Zooming by 2 about the centre (16, 16): out(r, c) = ramp(16 + (r - 16) / 2, ...).
  expected = (16 + (rows - 16) / 2) + 2 * (16 + (cols - 16) / 2)
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-3)


def test_random_affine_ranges_are_respected(noise):
  outs = [augment.random_affine(noise, seed(i)).numpy() for i in range(3)]
  assert all(o.shape == noise.shape for o in outs)
  assert not np.array_equal(outs[0], outs[1])


def test_brightness_scales_exactly_and_clips():
  const = np.full((8, 8, 1), 100, np.uint8)
  for f in (0.6, 1.3, 3.0):
    out = augment.color_jitter(const, seed(0), brightness=(f, f), contrast=(1.0, 1.0))
    np.testing.assert_allclose(out, np.full((8, 8, 1), min(100 * f, 255.0)), rtol=1e-6)


def test_contrast_keeps_the_mean_and_scales_deviations():
  image = np.random.default_rng(3).uniform(60, 200, (32, 32, 1)).astype(np.float32)
  for c in (0.6, 1.2):
    out = augment.color_jitter(image, seed(1), brightness=(1.0, 1.0), contrast=(c, c)).numpy()
    assert out.mean() == pytest.approx(image.mean(), abs=1e-3)
    np.testing.assert_allclose(out - out.mean(), c * (image - image.mean()), atol=1e-3)


def test_blur_keeps_constant_and_matches_scipy():
  const = np.full((30, 30, 1), 77.0, np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(const, seed(0)), const, atol=1e-3)
  image = np.random.default_rng(4).uniform(0, 255, (30, 36, 1)).astype(np.float32)
  for sigma in (0.5, 1.7, 3.0):
    out = augment.gaussian_blur(image, seed(0), sigma=(sigma, sigma)).numpy()
    radius = int(np.ceil(3 * sigma))  # The default: ceil(3 * max sigma).
    ref = ndimage.gaussian_filter(
      image.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror", truncate=radius / sigma
    )
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_center_crop():
  image = np.random.default_rng(5).integers(0, 255, (256, 300, 1)).astype(np.uint8)
  out = augment.center_crop(image, size=224, resize=256).numpy()
  np.testing.assert_array_equal(out, image[16:240, 38:262])
  assert augment.center_crop(np.zeros((512, 600, 1), np.uint8)).shape == (224, 224, 1)


def test_train_chain_is_deterministic_per_seed(sample_data_dir):
  path = sorted((sample_data_dir / "covid_cxr_notes" / "images").glob("*.png"))[0]
  image = np.asarray(Image.open(path).convert("L"))[..., None]
  chain = tf.function(lambda im, s: augment.convirt_train_augment(im, s, CFG))
  a, b, c = chain(image, seed(7)), chain(image, seed(7)), chain(image, seed(8))
  assert a.shape == (224, 224, 1) and a.dtype == tf.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize(
  "op",
  [augment.random_resized_crop, augment.random_affine, augment.color_jitter, augment.gaussian_blur],
)
def test_each_op_same_seed_same_output(op, noise):
  kwargs = {"size": 32, "resize": 40} if op is augment.random_resized_crop else {}
  a = op(noise, seed(1, 2), **kwargs).numpy()
  np.testing.assert_array_equal(a, op(noise, seed(1, 2), **kwargs))
  assert not np.array_equal(a, op(noise, seed(2, 2), **kwargs))
