"""Image decode + resize for the corpus builders (PIL and numpy only: cheap to import in workers).

Every corpus stores its images the same way: 8-bit grayscale PNG, downscaled (never upscaled)
so that the shorter side is `image_size`, aspect ratio kept, no crop. 16-bit and float sources
are rescaled to 0..255 by their maximum. DICOM files (`load_dicom`, used by
`data_pipelines.rsna_pneumonia`) go through the modality LUT, the VOI window when the file has
one, a min-max rescale to 0..255 (8-bit data is kept as-is) and, for MONOCHROME1, inversion.
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
    return key, None, type(e).__name__  # The message may repeat the path.


def dicom_to_uint8(ds: Any) -> np.ndarray:
  """The pixel data of a pydicom dataset as a 2-D uint8 array, bright = dense (MONOCHROME2).

  Modality LUT (rescale slope/intercept), then the file's VOI window if it has one; data that
  is still 8-bit (BitsStored <= 8, no LUT applied) is kept as-is, anything else is min-max
  rescaled to 0..255. MONOCHROME1 (bright = air) is inverted. Colour (RGB/YBR) is converted
  to luminance.
  """
  from pydicom import pixels  # pylint: disable=g-import-not-at-top

  arr = ds.pixel_array
  if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
    arr = arr[0]  # Multi-frame: the first frame.
  if arr.ndim == 3:  # Colour; pixel_array already converted YBR to RGB.
    return np.asarray(Image.fromarray(arr.astype(np.uint8), mode="RGB").convert("L"))
  if arr.ndim != 2 or arr.size == 0:
    raise ValueError(f"DICOM pixel data of shape {arr.shape}")
  photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
  bits = int(getattr(ds, "BitsStored", 8) or 8)
  slope = float(getattr(ds, "RescaleSlope", 1) or 1)
  intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
  windowed = "WindowCenter" in ds and "WindowWidth" in ds
  if bits <= 8 and slope == 1 and intercept == 0 and not windowed and arr.min() >= 0:
    out = arr.astype(np.uint8)
  else:
    values = pixels.apply_modality_lut(arr, ds)
    if windowed:
      values = pixels.apply_voi_lut(values, ds)
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((values - lo) * scale + 0.5, 0, 255).astype(np.uint8)
  if photometric == "MONOCHROME1":
    out = 255 - out
  return out


def load_dicom(path: str | os.PathLike[str], image_size: int) -> bytes:
  """Reads a DICOM file (pydicom), returns resized grayscale PNG bytes.

  Raises:
    One of DICOM_ERRORS if the file is missing, not DICOM, or its pixel data cannot be decoded.
  """
  import pydicom  # pylint: disable=g-import-not-at-top

  ds = pydicom.dcmread(os.fspath(path))
  return pil_to_png(Image.fromarray(dicom_to_uint8(ds), mode="L"), image_size)


def dicom_errors() -> tuple[type[BaseException], ...]:
  """Failures of one DICOM file that mean "skip and count" (pydicom imported lazily)."""
  from pydicom import errors  # pylint: disable=g-import-not-at-top

  return IMAGE_ERRORS + (
    errors.InvalidDicomError,
    AttributeError,
    KeyError,
    TypeError,
    NotImplementedError,
    RuntimeError,
  )


def load_dicom_task(task: tuple[Any, str, int]) -> tuple[Any, bytes | None, str]:
  """Worker entry point for DICOM: (key, path, image_size) -> (key, png or None, error)."""
  key, path, image_size = task
  try:
    return key, load_dicom(path, image_size), ""
  except dicom_errors() as e:
    return key, None, type(e).__name__  # The message may repeat the path.
