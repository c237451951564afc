"""Prepare throughput (images/s) of `python -m data_pipelines.prepare` on a fixture tree.

The tree is the MIMIC-CXR-JPG + reports layout built by `tests/fixtures_layout.py` from every
patient of the real `covid_cxr_notes` sample (up to 4 images each, re-encoded as JPEG; real
IU report text). Run: `python bench/prepare.py [--num_workers=2] [--image_size=256]`.
The sample images are already small (shorter side ~256 px), so decode is far cheaper than on
the real 2,500 x 3,000 px MIMIC JPEGs: read the figure as the pipeline's overhead ceiling.
"""

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import fixtures_layout as fl  # noqa: E402  # pylint: disable=g-import-not-at-top
from tests.conftest import sample_dir  # noqa: E402  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=256)
  args = parser.parse_args()
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_prepare_"))
  try:
    manual = fl.mimic_cxr(sample_dir(), tmp / "mimic", n_patients=10_000, min_images=1)
    n_images = len(list(manual.rglob("*.jpg")))
    start = time.perf_counter()
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "data_pipelines.prepare",
        "mimic_cxr",
        f"--manual_dir={manual}",
        f"--data_dir={tmp / 'tfds'}",
        f"--image_size={args.image_size}",
        f"--num_workers={args.num_workers}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode:
      sys.exit(result.stderr[-3000:])
    print(result.stdout.strip())
    print(
      f"prepare mimic_cxr: {n_images} images in {seconds:.1f}s wall (incl. ~start-up) = "
      f"{n_images / seconds:.1f} images/s  [num_workers={args.num_workers}, "
      f"image_size={args.image_size}]"
    )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
