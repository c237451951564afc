r"""Turns a corpus on disk (its published layout) into a tfds dataset the trainer reads by name.

  python -m data_pipelines.prepare mimic_cxr --manual_dir=/data/mimic-cxr-jpg \
      [--data_dir=~/tensorflow_datasets] [--image_size=256] [--config=paired] [--num_workers=N]

Images are decoded and resized in `--num_workers` processes; tfds shows a progress bar per
split and writes into an `incomplete.*` folder that it renames only when every split is done,
so an interrupted run never leaves a dataset that reads as prepared. Stale `incomplete.*`
folders of an earlier, killed run of the same config are removed first. At the end a summary
gives the records written per split and the records skipped by reason.
"""

import os
import time

from absl import app, flags, logging
from etils import epath

from data_pipelines import common
from medvl_jax import cli
from medvl_jax.data import corpora
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
):
  """Builds corpus `name` from `manual_dir` (again if `rebuild`); returns the builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not manual_dir or not epath.Path(manual_dir).expanduser().is_dir():
    raise MedvlError(f"--manual_dir={manual_dir!r} is not a directory")
  builder = builder_for(
    name,
    config=config,
    image_size=image_size,
    data_dir=os.path.expanduser(data_dir) if data_dir else None,
  )
  if not builder.is_prepared():
    remove_stale_incomplete(builder)
  builder.num_workers = max(1, num_workers)
  tfds.enable_progress_bar()
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir),
      try_download_gcs=False,
      # Regenerates the dataset in place (tfds writes a new incomplete.* folder first).
      download_mode=(
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if rebuild
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      ),
    )
  )
  return builder


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
    )
  except MedvlError as e:
    # One line, exit 2 (as every CLI here); a DataError names the file and line or row.
    cli.die(str(e).splitlines()[0] if str(e) else type(e).__name__)
  print(summary(builder))
  print(f"  took {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
