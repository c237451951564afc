"""The batch layout, declared once: what the input pipeline yields and the steps consume.

Per host, a train batch of B rows is
  image           uint8 [B, S, S, 1]  (S = config.data.image_size; a text-only row: zeros)
  input_ids       int32 [B, L]        (L = config.data.max_length; an image-only row: pad id)
  attention_mask  int32 [B, L]        (an image-only row: all 0)
  has_image       bool  [B]
  has_text        bool  [B]
  source          int32 [B]           (index of the row's entry in config.data.sources)
and an eval batch adds
  mask            bool  [B]           (False = a padding row, ignored by the metrics)

Imports only NumPy, so benchmarks of any framework can build batches from it. `eval=True`
selects the eval layout (the name shadows the builtin on purpose: it is the layout's word).
"""

# pylint: disable=redefined-builtin
from typing import Any

import numpy as np

from medvl_jax.errors import DataError

# key -> (per-example shape as a function of (S, L), dtype), in the order above.
_LAYOUT = {
  "image": (lambda s, l: (s, s, 1), np.uint8),
  "input_ids": (lambda s, l: (l,), np.int32),
  "attention_mask": (lambda s, l: (l,), np.int32),
  "has_image": (lambda s, l: (), np.bool_),
  "has_text": (lambda s, l: (), np.bool_),
  "source": (lambda s, l: (), np.int32),
}
_EVAL_ONLY = {"mask": (lambda s, l: (), np.bool_)}

TRAIN_KEYS = tuple(_LAYOUT)
EVAL_KEYS = TRAIN_KEYS + tuple(_EVAL_ONLY)
EVAL_ONLY_KEYS = tuple(_EVAL_ONLY)
# The model's inputs (what `model.apply` takes, in its argument order).
MODEL_INPUTS = ("image", "input_ids", "attention_mask")


def keys(eval: bool = False) -> tuple[str, ...]:
  return EVAL_KEYS if eval else TRAIN_KEYS


def spec(
  image_size: int, max_length: int, eval: bool = False
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (per-example shape, without the batch dimension; dtype)}."""
  layout = dict(_LAYOUT, **_EVAL_ONLY) if eval else _LAYOUT
  return {
    k: (shape(image_size, max_length), np.dtype(dtype)) for k, (shape, dtype) in layout.items()
  }


def zeros(
  batch_size: int, image_size: int, max_length: int, eval: bool = False
) -> dict[str, np.ndarray]:
  """A dummy batch (for init and tracing): zero images and ids, every row has an image and a
  text (attention on every position), source 0, and in eval every row is real."""
  out = {
    k: np.zeros((batch_size,) + shape, dtype)
    for k, (shape, dtype) in spec(image_size, max_length, eval).items()
  }
  for k in ("attention_mask", "has_image", "has_text") + (("mask",) if eval else ()):
    out[k][...] = 1
  return out


def from_config(config, batch_size: int, eval: bool = False) -> dict[str, np.ndarray]:
  """`zeros` at config.data.image_size and config.data.max_length."""
  return zeros(batch_size, config.data.image_size, config.data.max_length, eval)


def random(
  batch_size: int,
  image_size: int,
  max_length: int,
  *,
  seed: int = 0,
  token_range: tuple[int, int] = (1000, 28000),
  min_length: int = 16,
) -> dict[str, np.ndarray]:
  """A synthetic paired train batch for benchmarks: uniform uint8 images, token ids drawn from
  `token_range`, text lengths uniform in [min(min_length, max_length - 1), max_length)."""
  rng = np.random.default_rng(seed)
  n, s, l = batch_size, image_size, max_length
  lengths = rng.integers(min(min_length, l - 1), l, size=n)
  out = zeros(n, s, l)
  out["image"] = rng.integers(0, 256, (n, s, s, 1), dtype=np.uint8)
  out["input_ids"] = rng.integers(*token_range, (n, l)).astype(np.int32)
  out["attention_mask"] = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
  return out


def check(
  batch: dict[str, Any],
  *,
  image_size: int | None = None,
  max_length: int | None = None,
  batch_size: int | None = None,
  eval: bool = False,
  where: str = "batch",
) -> None:
  """Raises DataError (one line naming `where` and the key) unless `batch` has exactly the
  layout's keys, dtypes and shapes. Unknown S / L / B are taken from the batch itself."""
  expected = keys(eval)
  missing = [k for k in expected if k not in batch]
  extra = sorted(set(batch) - set(expected))
  if missing or extra:
    raise DataError(
      f"{where}: missing keys {missing}, unexpected keys {extra}; "
      f"a {'eval' if eval else 'train'} batch has {', '.join(expected)}"
    )
  image_shape = np.shape(batch["image"])
  if len(image_shape) != 4:
    raise DataError(f"{where}: 'image' has shape {tuple(image_shape)}; expected [B, S, S, 1]")
  ids_shape = np.shape(batch["input_ids"])
  if len(ids_shape) != 2:
    raise DataError(f"{where}: 'input_ids' has shape {tuple(ids_shape)}; expected [B, L]")
  b = image_shape[0] if batch_size is None else batch_size
  s = image_shape[1] if image_size is None else image_size
  l = ids_shape[1] if max_length is None else max_length
  for k, (shape, dtype) in spec(s, l, eval).items():
    v = batch[k]
    got_dtype = getattr(v, "dtype", None)
    if got_dtype is None or np.dtype(got_dtype) != dtype:
      raise DataError(f"{where}: {k!r} has dtype {got_dtype}; expected {dtype.name}")
    if tuple(np.shape(v)) != (b,) + shape:
      raise DataError(
        f"{where}: {k!r} has shape {tuple(np.shape(v))}; expected "
        f"{(b,) + shape} (B={b}, S={s}, L={l})"
      )
