"""Image decode + resize for the corpus builders (PIL and numpy only: cheap to import in workers).

Every corpus stores its images the same way: 8-bit grayscale PNG, downscaled (never upscaled)
so that the shorter side is `image_size`, aspect ratio kept, no crop. 16-bit and float sources
are rescaled to 0..255 by their maximum; DICOM pixel data is windowed by the caller
(`data_pipelines.rsna_pneumonia`) before it gets here.
"""
import io
import os
from typing import Any

import numpy as np
from PIL import Image

# Failures of one image that mean "skip and count", not "stop".
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def to_grayscale_uint8(img: Image.Image) -> Image.Image:
  """8-bit grayscale ("L"); 16-bit/float modes are scaled by their maximum."""
  if img.mode == "L":
    return img
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * (255.0 / max(float(arr.max()), 1.0))
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (0, 0, 0, 255))
    img = Image.alpha_composite(background, img)
  return img.convert("L")


def resize_shorter_side(img: Image.Image, image_size: int) -> Image.Image:
  """Downscales so that min(w, h) == image_size (no upscaling, no crop)."""
  w, h = img.size
  short = min(w, h)
  if short <= image_size:
    return img
  scale = image_size / short
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if w <= h:
    size = (image_size, size[1])
  else:
    size = (size[0], image_size)
  return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_png(img: Image.Image) -> bytes:
  out = io.BytesIO()
  img.save(out, format="PNG", compress_level=6)
  return out.getvalue()


def pil_to_png(img: Image.Image, image_size: int) -> bytes:
  return encode_png(resize_shorter_side(to_grayscale_uint8(img), image_size))


def load_png(path: str | os.PathLike[str], image_size: int) -> bytes:
  """Reads an image file (PNG/JPEG/...), returns resized grayscale PNG bytes.

  Raises:
    One of IMAGE_ERRORS if the file is missing, truncated or not an image.
  """
  with Image.open(os.fspath(path)) as img:
    if img.format == "JPEG":  # Let libjpeg decode at 1/2..1/8 scale: much faster.
      img.draft("L", (image_size, image_size))
    img.load()  # Full decode: catches truncated or corrupt files.
    return pil_to_png(img, image_size)


def load_task(task: tuple[Any, str, int]) -> tuple[Any, bytes | None, str]:
  """Worker entry point: (key, path, image_size) -> (key, png or None, error)."""
  key, path, image_size = task
  try:
    return key, load_png(path, image_size), ""
  except IMAGE_ERRORS as e:
    return key, None, f"{type(e).__name__}: {e}"
