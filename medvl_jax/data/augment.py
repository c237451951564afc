"""ConVIRT image augmentations as small, stateless TensorFlow ops.

Every random op takes an image ([H, W, C], uint8 or float32 in [0, 255]) and a stateless
seed (shape [2] int32/int64), so its output is a pure function of its inputs: the input
pipeline derives the seeds from (config seed, epoch, example position). Ops return float32 in
[0, 255] (except `random_flip`, which keeps the dtype); `to_uint8` rounds at the end.

The train chain follows docs/METHODS.md (ConVIRT): random resized crop (after resizing the
shorter side), horizontal flip, affine, brightness/contrast jitter, Gaussian blur.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import tensorflow as tf

try:  # The input pipeline must not grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices already initialised by an earlier import.
  pass

Range = Sequence[float]


def to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(image, tf.float32)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a [0, 255] float image to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _uniform(seed: tf.Tensor, lo: float, hi: float, shape=()) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear (antialiased) resize so the shorter side is `size`, like torchvision Resize."""
  image = to_float(image)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(
    tf.cast(size, tf.int64) * tf.cast(long, tf.int64) // tf.cast(short, tf.int64), tf.int32
  )
  new_hw = tf.where(h <= w, tf.stack([size, new_long]), tf.stack([new_long, size]))

  def resize():
    return tf.image.resize(image, new_hw, method="bilinear", antialias=True)

  return tf.cond(tf.equal(short, size), lambda: image, resize)


def sample_crop_window(
  height: tf.Tensor,
  width: tf.Tensor,
  seed: tf.Tensor,
  scale: Range = (0.6, 1.0),
  ratio: Range = (3 / 4, 4 / 3),
  attempts: int = 10,
) -> tf.Tensor:
  """torchvision's RandomResizedCrop window: returns int32 [y, x, h, w].

  Tries `attempts` (area fraction, log-uniform aspect ratio) draws and keeps the first that
  fits; otherwise falls back to a centred crop with the aspect ratio clamped to `ratio`.
  """
  s_area, s_ratio, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = hf * wf * _uniform(s_area, scale[0], scale[1], [attempts])
  aspect = tf.exp(_uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), [attempts]))
  ws = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Fallback: whole image, aspect ratio clamped into `ratio`.
  in_ratio = wf / hf
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
  ok = tf.reduce_any(fits)
  h = tf.where(ok, hs[first], fb_h)
  w = tf.where(ok, ws[first], fb_w)
  y_rand = tf.cast(
    tf.floor(_uniform(s_y, 0.0, 1.0) * tf.cast(height - h + 1, tf.float32)), tf.int32
  )
  x_rand = tf.cast(tf.floor(_uniform(s_x, 0.0, 1.0) * tf.cast(width - w + 1, tf.float32)), tf.int32)
  y = tf.where(ok, tf.minimum(y_rand, height - h), (height - h) // 2)
  x = tf.where(ok, tf.minimum(x_rand, width - w), (width - w) // 2)
  return tf.stack([y, x, h, w])


def crop_and_resize(image: tf.Tensor, window: tf.Tensor, size: int) -> tf.Tensor:
  """Crops `window` ([y, x, h, w]) and resizes it (bilinear, antialiased) to size x size."""
  y, x, h, w = tf.unstack(window)
  crop = image[y : y + h, x : x + w]
  out = tf.image.resize(to_float(crop), [size, size], method="bilinear", antialias=True)
  return tf.ensure_shape(out, [size, size, image.shape[-1]])


def random_resized_crop(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int = 224,
  scale: Range = (0.6, 1.0),
  ratio: Range = (3 / 4, 4 / 3),
  resize: int = 256,
) -> tf.Tensor:
  """Resizes the shorter side to `resize`, then takes a RandomResizedCrop to size x size."""
  image = resize_shorter_side(image, resize)
  shape = tf.shape(image)
  window = sample_crop_window(shape[0], shape[1], seed, scale, ratio)
  return crop_and_resize(image, window, size)


def random_flip(image: tf.Tensor, seed: tf.Tensor, p: float = 0.5) -> tf.Tensor:
  """Horizontal flip with probability p."""
  fire = _uniform(seed, 0.0, 1.0) < p
  return tf.cond(fire, lambda: tf.reverse(image, axis=[1]), lambda: image)


def affine_transform(
  image: tf.Tensor, angle: tf.Tensor, translate: Sequence[tf.Tensor], scale: tf.Tensor
) -> tf.Tensor:
  """Rotates (degrees, counter-clockwise as displayed), scales and translates (pixels, +x is
  right, +y is down) about the image centre; bilinear, out-of-image pixels are 0."""
  image = to_float(image)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  cx = (tf.cast(w, tf.float32) - 1.0) / 2.0
  cy = (tf.cast(h, tf.float32) - 1.0) / 2.0
  theta = tf.cast(angle, tf.float32) * (math.pi / 180.0)
  inv_s = 1.0 / tf.cast(scale, tf.float32)
  cos, sin = tf.cos(theta) * inv_s, tf.sin(theta) * inv_s
  ox = cx + tf.cast(translate[0], tf.float32)
  oy = cy + tf.cast(translate[1], tf.float32)
  # Inverse map (output -> input pixel): p_in = c + R(-theta) (p_out - c - t) / s.
  transform = tf.stack(
    [cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy, 0.0, 0.0]
  )
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform[None],
    output_shape=tf.stack([h, w]),
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode="CONSTANT",
  )
  return tf.ensure_shape(out[0], image.shape)


def random_affine(
  image: tf.Tensor,
  seed: tf.Tensor,
  degrees: float = 20.0,
  translate: float = 0.1,
  scale: Range = (0.95, 1.05),
) -> tf.Tensor:
  """torchvision RandomAffine: angle in [-degrees, degrees], integer shift up to
  translate * size, isotropic scale in `scale`; no shear."""
  s_angle, s_tx, s_ty, s_scale = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  shape = tf.cast(tf.shape(image), tf.float32)
  max_dx, max_dy = translate * shape[1], translate * shape[0]
  angle = _uniform(s_angle, -degrees, degrees)
  tx = tf.round(max_dx * _uniform(s_tx, -1.0, 1.0))
  ty = tf.round(max_dy * _uniform(s_ty, -1.0, 1.0))
  return affine_transform(image, angle, (tx, ty), _uniform(s_scale, scale[0], scale[1]))


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision adjust_brightness: image * factor, clipped to [0, 255]."""
  return tf.clip_by_value(to_float(image) * factor, 0.0, 255.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision adjust_contrast: blend with the mean grey level, clipped to [0, 255]."""
  image = to_float(image)
  mean = tf.reduce_mean(image)
  return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 255.0)


def color_jitter(
  image: tf.Tensor, seed: tf.Tensor, brightness: Range = (0.6, 1.4), contrast: Range = (0.6, 1.4)
) -> tf.Tensor:
  """torchvision ColorJitter restricted to brightness and contrast: multiplicative factors
  drawn uniformly from the ranges, applied in a random order."""
  s_b, s_c, s_order = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  b = _uniform(s_b, brightness[0], brightness[1])
  c = _uniform(s_c, contrast[0], contrast[1])
  image = to_float(image)
  return tf.cond(
    _uniform(s_order, 0.0, 1.0) < 0.5,
    lambda: adjust_contrast(adjust_brightness(image, b), c),
    lambda: adjust_brightness(adjust_contrast(image, c), b),
  )


def gaussian_kernel(sigma: tf.Tensor, radius: int) -> tf.Tensor:
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


def blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding (edge not repeated, like scipy 'mirror')."""
  image = to_float(image)
  k = gaussian_kernel(tf.cast(sigma, tf.float32), radius)
  x = tf.transpose(image, [2, 0, 1])[..., None]  # Channels as batch: [C, H, W, 1].
  x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
  x = tf.nn.conv2d(x, tf.reshape(k, [-1, 1, 1, 1]), strides=1, padding="VALID")
  x = tf.nn.conv2d(x, tf.reshape(k, [1, -1, 1, 1]), strides=1, padding="VALID")
  return tf.ensure_shape(tf.transpose(x[..., 0], [1, 2, 0]), image.shape)


def gaussian_blur(
  image: tf.Tensor, seed: tf.Tensor, sigma: Range = (0.1, 3.0), radius: int | None = None
) -> tf.Tensor:
  """Gaussian blur with sigma drawn uniformly from `sigma`; the kernel radius defaults to
  ceil(3 * max sigma) (19 taps for sigma up to 3)."""
  if radius is None:
    radius = int(math.ceil(3.0 * sigma[1]))
  return blur(image, _uniform(seed, sigma[0], sigma[1]), radius)


def center_crop(image: tf.Tensor, size: int = 224, resize: int = 256) -> tf.Tensor:
  """Eval transform: shorter side to `resize`, then the central size x size window."""
  image = resize_shorter_side(image, resize)
  shape = tf.shape(image)
  y, x = (shape[0] - size) // 2, (shape[1] - size) // 2
  return tf.ensure_shape(image[y : y + size, x : x + size], [size, size, image.shape[-1]])


def convirt_train_augment(
  image: tf.Tensor, seed: tf.Tensor, cfg: Mapping[str, Any], *, size: int = 224, resize: int = 256
) -> tf.Tensor:
  """The ConVIRT train chain; returns uint8 [size, size, C].

  Args:
    image: [H, W, C] uint8 or float32 image.
    seed: stateless seed, shape [2].
    cfg: `config.data.augment`: crop_scale, flip_p, rotation, translate, affine_scale,
      brightness, contrast, blur_sigma.
    size: output side.
    resize: shorter side before the crop.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  x = random_resized_crop(image, seeds[0], size, scale=tuple(cfg["crop_scale"]), resize=resize)
  x = random_flip(x, seeds[1], p=cfg["flip_p"])
  x = random_affine(
    x,
    seeds[2],
    degrees=cfg["rotation"],
    translate=cfg["translate"],
    scale=tuple(cfg["affine_scale"]),
  )
  x = color_jitter(
    x, seeds[3], brightness=tuple(cfg["brightness"]), contrast=tuple(cfg["contrast"])
  )
  x = gaussian_blur(x, seeds[4], sigma=tuple(cfg["blur_sigma"]))
  return to_uint8(x)


def mae_train_augment(
  image: tf.Tensor, seed: tf.Tensor, cfg: Mapping[str, Any], *, size: int = 224, resize: int = 256
) -> tf.Tensor:
  """A light, MAE-style chain: random resized crop + horizontal flip; uint8 [size, size, C].

  Uses `cfg['crop_scale']` and `cfg['flip_p']` of `config.data.augment` (MAE itself crops
  with scale (0.2, 1.0)).
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  x = random_resized_crop(image, seeds[0], size, scale=tuple(cfg["crop_scale"]), resize=resize)
  return to_uint8(random_flip(x, seeds[1], p=cfg["flip_p"]))


# Train chains by name (`config.data.augment_chain`, or a source's 'augment').
CHAINS = {"convirt": convirt_train_augment, "mae": mae_train_augment}
