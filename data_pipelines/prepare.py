r"""Builds a corpus, from its published layout, into the tfds data dir that training reads: the
tfds dataset and the random-access copy of every split. Prepare once, on one machine; training
hosts only read (medvl_jax/data/sources.py).

  python -m data_pipelines.prepare mimic_cxr --manual_dir=/data/mimic-cxr-jpg \
      [--data_dir=~/tensorflow_datasets | --data_dir=gs://bucket/tfds] [--image_size=256] \
      [--config=paired] [--num_workers=N] [--staging_dir=DIR] [--rebuild]

Images are decoded and resized in `--num_workers` processes; tfds shows a progress bar per
split and writes into an `incomplete.*` folder that it renames only when every split is done.
Then every split gets its random-access ArrayRecord copy (medvl_jax/data/records.py; a
progress bar each), written under a temporary name and renamed when whole. So an interrupted
run leaves no dataset and no copy that reads as complete; run again, it removes what the
killed run left (stale `incomplete.*` folders, temporaries) and finishes what is missing. At
the end a summary gives the records written per split and the records skipped by reason.

A bucket (`--data_dir=gs://...`): tfds writes through TensorFlow's GCS client, which no
emulator can stand in for, so the dataset is built in a local staging directory
(`--staging_dir`, by default one under the system's temporary directory, removed once the
upload is done; a rerun after a failed upload reuses the build) and uploaded through
medvl_jax/paths.py: data files and copies first, the tfds metadata last, `dataset_info.json`
the very last object, since a config reads as prepared (to tfds and to training) only once it
exists.
"""

from concurrent import futures
import os
import shutil
import tempfile
import time

from absl import app, flags, logging
from etils import epath

from data_pipelines import common
from medvl_jax import cli, paths, progress
from medvl_jax.data import corpora, records
from medvl_jax.errors import MedvlError

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The corpus in its published layout.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (default ~/tensorflow_datasets).")
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", common.DEFAULT_IMAGE_SIZE, f"Stored shorter side; one of {common.IMAGE_SIZES}."
)
_CONFIG = flags.DEFINE_string("config", None, "Base builder config (default per corpus).")
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers", os.cpu_count() or 1, "Processes that decode and resize images."
)
_STAGING_DIR = flags.DEFINE_string(
  "staging_dir",
  None,
  "With a gs:// --data_dir: the local directory the dataset is built in before the upload "
  "(default: one under the system's temporary directory, removed after the upload).",
)
_REBUILD = flags.DEFINE_bool(
  "rebuild", False, "Build again even if prepared (e.g. after the source files changed)."
)


def builder_for(name: str, *, config: str | None, image_size: int, data_dir: str | None):
  """The tfds builder of registered corpus `name` (`medvl_jax.data.corpora`) at `image_size`.

  Raises MedvlError (one line) on an unknown name or config.
  """
  full = common.config_name(config or corpora.get(name, key="corpus").default_config, image_size)
  names = corpora.config_names(name)
  if full not in names:
    bases = sorted({n for n in names if not n.rsplit("_", 1)[-1].isdigit()})
    raise MedvlError(f"{name}: no config {full!r}; base configs: {', '.join(bases)}")
  return corpora.builder(name, full, data_dir)


def remove_stale_incomplete(builder) -> list[epath.Path]:
  """Deletes `incomplete.*` folders that a killed run of this config left behind."""
  parent = epath.Path(builder.data_dir).parent  # <data_dir>/<name>/<config>
  stale = sorted(parent.glob("incomplete.*")) if parent.exists() else []
  for path in stale:
    logging.warning("removing %s (left by an interrupted prepare)", path)
    path.rmtree()
  return stale


def summary(builder) -> str:
  lines = [f"{builder.name}/{builder.builder_config.name} in {builder.data_dir}:"]
  for split, info in builder.info.splits.items():
    lines.append(f"  {split:<12} {info.num_examples:>9,d} records")
  skipped = dict(builder.info.metadata.get("skipped", {}))
  lines.append(
    f"  skipped      {sum(skipped.values()):>9,d} records"
    + "".join(f"\n    {reason:<20} {n:>9,d}" for reason, n in sorted(skipped.items()))
  )
  lines.append(f"  {common.skipped_line(skipped)}")
  copied = [s for s in builder.info.splits if paths.exists(records.copy_path(builder, s))]
  lines.append(
    f"  random access: {', '.join(copied) or 'no split'} "
    f"({paths.join(builder.data_dir, records.COPY_DIR)})"
  )
  return "\n".join(lines)


def prepare(
  name: str,
  manual_dir: str,
  *,
  data_dir: str | None = None,
  image_size: int = common.DEFAULT_IMAGE_SIZE,
  config: str | None = None,
  num_workers: int = 1,
  rebuild: bool = False,
  staging_dir: str | None = None,
):
  """Builds corpus `name` from `manual_dir` (again if `rebuild`) with the random-access copy
  of every split, into `data_dir` (local or gs://); returns the builder of `data_dir`."""
  if not manual_dir or not epath.Path(manual_dir).expanduser().is_dir():
    raise MedvlError(f"--manual_dir={manual_dir!r} is not a directory")
  options = dict(config=config, image_size=image_size)
  if not data_dir or not paths.is_url(data_dir):
    local = os.path.expanduser(data_dir) if data_dir else None
    return _build(name, manual_dir, local, num_workers=num_workers, rebuild=rebuild, **options)
  paths.check_reachable(data_dir)
  target = builder_for(name, data_dir=data_dir, **options)
  if target.is_prepared() and records.has_copies(target) and not rebuild:
    return target
  staging = os.path.expanduser(staging_dir) if staging_dir else _default_staging(data_dir)
  built = _build(name, manual_dir, staging, num_workers=num_workers, rebuild=rebuild, **options)
  upload(built, target.data_dir)
  if not staging_dir:
    shutil.rmtree(staging, ignore_errors=True)
  return builder_for(name, data_dir=data_dir, **options)  # Its metadata, read from the bucket.


def _default_staging(url: str) -> str:
  return os.path.join(
    tempfile.gettempdir(), "medvl_prepare", url.removeprefix("gs://").strip("/").replace("/", "_")
  )


def _build(name, manual_dir, data_dir, *, config, image_size, num_workers, rebuild):
  """The tfds build into a local `data_dir` (None: tfds's default) and the copies."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = builder_for(name, config=config, image_size=image_size, data_dir=data_dir)
  if not builder.is_prepared():
    remove_stale_incomplete(builder)
  builder.num_workers = max(1, num_workers)
  tfds.enable_progress_bar()
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir),
      try_download_gcs=False,
      # Regenerates the dataset in place (tfds writes a new incomplete.* folder first and
      # replaces the old folder, its copies included, at the end).
      download_mode=(
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if rebuild
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      ),
    )
  )
  records.write_copies(builder, show_progress=True)
  return builder


# tfds takes a config for prepared once both exist; it reads dataset_info.json first.
_METADATA_LAST = ("features.json", "dataset_info.json")
_UPLOAD_THREADS = 8


def upload(built, url: str) -> int:
  """Copies the local prepared dataset of builder `built` to `url` (the same
  <data_dir>/<name>/<config>/<version> in the bucket); returns the bytes.

  Objects are written whole (GCS publishes an object only when its upload completes): data
  files and copies first, `_METADATA_LAST` last, so a reader never takes a partial upload for
  a prepared dataset. An earlier upload's dataset_info.json is removed first.
  """
  local = os.fspath(built.data_dir)
  files = []
  for root, _, names in os.walk(local):
    for n in names:
      if not (n.startswith(".") and n.endswith(".tmp")):
        files.append(os.path.relpath(os.path.join(root, n), local))
  last = [f for f in _METADATA_LAST if f in files]
  first = sorted(f for f in files if f not in last)
  pairs = [(os.path.join(local, f), paths.join(url, *f.split(os.sep))) for f in first]
  # tfds's record of the default config (<data_dir>/<name>/.config/metadata.json).
  config_record = os.path.join(os.path.dirname(os.path.dirname(local)), ".config", "metadata.json")
  if os.path.exists(config_record):
    url_root = url.rstrip("/").rsplit("/", 2)[0]
    pairs.append((config_record, paths.join(url_root, ".config", "metadata.json")))
  pairs += [(os.path.join(local, f), paths.join(url, f)) for f in last]
  total = sum(os.path.getsize(src) for src, _ in pairs)
  logging.info("uploading %d files (%.1f MB) to %s", len(pairs), total / 1e6, url)
  paths.remove(paths.join(url, "dataset_info.json"), missing_ok=True)
  done = 0
  with progress.bar(total, f"upload to {url}", unit="B", min_total=0, unit_scale=True) as bar:
    with futures.ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
      data = pairs[: len(pairs) - len(last)]
      for n in pool.map(lambda pair: paths.copy(*pair), data):
        done += n
        bar.update(n)
    for src, dst in pairs[len(data) :]:
      n = paths.copy(src, dst)
      done += n
      bar.update(n)
  return done


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(
      f"usage: python -m data_pipelines.prepare {{{','.join(corpora.names())}}} --manual_dir=DIR"
    )
  start = time.perf_counter()
  try:
    builder = prepare(
      argv[1],
      _MANUAL_DIR.value,
      data_dir=_DATA_DIR.value,
      image_size=_IMAGE_SIZE.value,
      config=_CONFIG.value,
      num_workers=_NUM_WORKERS.value,
      rebuild=_REBUILD.value,
      staging_dir=_STAGING_DIR.value,
    )
  except MedvlError as e:
    # One line, exit 2 (as every CLI here); a DataError names the file and line or row.
    cli.die(str(e).splitlines()[0] if str(e) else type(e).__name__)
  print(summary(builder))
  print(f"  took {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
