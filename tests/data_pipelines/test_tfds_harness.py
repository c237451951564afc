"""The six corpus builders (and Open-i's text-only config) under tfds's own builder test harness,
`tfds.testing.DatasetBuilderTestCase`, each over a small dummy tree in the corpus's published
layout (`tests/fixtures_layout.py`: real sample radiographs and report text).

The harness builds one config per builder with `manual_dir` = the dummy tree, then checks
registration, info, example specs against the features, the expected example count per split,
that no two splits share an example, and a reload from disk; it also forbids `os`/`open` in the
builder module. The trees are written in `setUpClass` (as the fixture tests do) rather than
stored under each builder's `dummy_data/`, so that they hold real images without adding binary
files to the package; `EXAMPLE_DIR` points the harness at them.

SPLITS are the counts the tree's design gives; `layout_splits` recounts them from the tree's
own files (official split files, or `common.split_for_patient` of the patient id where a corpus
has none), independently of the builder, so a tree change that moves them fails loudly.
"""

import csv
import gzip
import io
import pathlib
import shutil
import tarfile
import tempfile

import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.chexpert import Builder as ChexpertBuilder
from data_pipelines.covidx import Builder as CovidxBuilder
from data_pipelines.mimic_cxr import Builder as MimicBuilder
from data_pipelines.nih14 import Builder as Nih14Builder
from data_pipelines.openi import Builder as OpeniBuilder
from data_pipelines.rsna_pneumonia import Builder as RsnaBuilder
from tests import conftest
from tests import fixtures_layout as fl


def _rows(path: pathlib.Path, **kw) -> list[dict[str, str]]:
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    data = gzip.decompress(data)
  return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""), **kw))


def _hash_split(patient: str, *, two_way: bool = False) -> str:
  split = common.split_for_patient(patient)
  return ("train" if split == "train" else "validation") if two_way else split


def _count(splits: list[str]) -> dict[str, int]:
  return {s: splits.count(s) for s in ("train", "validation", "test") if s in splits}


class _Harness:
  """Mixed in before `DatasetBuilderTestCase` (so that pytest does not collect it alone):
  writes the dummy tree before the harness reads `EXAMPLE_DIR`; removes it after."""

  SKIP_CHECKSUMS = True  # Manual-download corpora: nothing is downloaded.

  @classmethod
  def make_tree(cls, sample: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    raise NotImplementedError

  @classmethod
  def layout_splits(cls, root: pathlib.Path) -> dict[str, int]:
    raise NotImplementedError

  @classmethod
  def setUpClass(cls):
    cls._tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{cls.DATASET_CLASS.name}_dummy_"))
    cls.EXAMPLE_DIR = str(cls.make_tree(conftest.sample_dir(), cls._tmp))
    super().setUpClass()
    assert cls.layout_splits(pathlib.Path(cls.EXAMPLE_DIR)) == cls.SPLITS, (
      cls.layout_splits(pathlib.Path(cls.EXAMPLE_DIR)),
      cls.SPLITS,
    )

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    shutil.rmtree(cls._tmp, ignore_errors=True)

  def test_metadata_files(self):
    """The dataset card and citation next to the builder are what tfds reports."""
    folder = pathlib.Path(self.DATASET_CLASS.code_path).parent
    info = self.builder.info
    # tfds strips the files' surrounding whitespace.
    self.assertEqual(info.description, (folder / "README.md").read_text(encoding="utf-8").strip())
    self.assertEqual(info.citation, (folder / "CITATIONS.bib").read_text(encoding="utf-8").strip())
    self.assertTrue(info.citation.lstrip().startswith("@"))
    for section in ("## Source", "## License", "## Layout", "## Features", "## Splits"):
      self.assertIn(section, info.description)


class MimicCxrTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = MimicBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["paired_64"]
  # 5 patients, official split by patient index (train, train, train, validate, test); each
  # patient has 2-4 images.
  SPLITS = {"train": 7, "validation": 4, "test": 3}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.mimic_cxr(sample, root, n_patients=5)

  @classmethod
  def layout_splits(cls, root):
    split = {"train": "train", "validate": "validation", "test": "test"}
    return _count([split[r["split"]] for r in _rows(root / "mimic-cxr-2.0.0-split.csv.gz")])


class Nih14Test(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Nih14Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["default_64"]
  # 12 images; every 4th is on test_list.txt, the rest split by patient hash.
  SPLITS = {"train": 6, "validation": 3, "test": 3}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.nih14(sample, root, n=12)

  @classmethod
  def layout_splits(cls, root):
    test = set((root / "test_list.txt").read_text().split())
    return _count(
      [
        "test" if r["Image Index"] in test else _hash_split(r["Patient ID"], two_way=True)
        for r in _rows(root / "Data_Entry_2017_v2020.csv")
      ]
    )


class ChexpertTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = ChexpertBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["u_ignore_64"]
  # 8 patients: every 4th in valid.csv (test); train.csv patients by hash, the first three
  # numbered to fall outside the train bucket.
  SPLITS = {"train": 8, "validation": 7, "test": 5}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.chexpert(sample, root, n_patients=8)

  @classmethod
  def layout_splits(cls, root):
    folder = root / "CheXpert-v1.0-small"
    return _count(
      [_hash_split(r["Path"].split("/")[2], two_way=True) for r in _rows(folder / "train.csv")]
      + ["test"] * len(_rows(folder / "valid.csv"))
    )


class OpeniTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = OpeniBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["paired_64"]
  # 7 reports with 2 images each, split by report-id hash: 4 train, 2 validation, 1 test.
  SPLITS = {"train": 8, "validation": 4, "test": 2}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.openi(sample, root, report_ids=("1", "2", "4", "6", "9", "14", "32"))

  @classmethod
  def layout_splits(cls, root):
    return _count([_hash_split(r["uid"]) for r in _rows(root / "indiana_projections.csv")])


class OpeniReportsTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = OpeniBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["reports"]
  # The same 7 reports, text only, as the distribution archive alone: one example per report.
  SPLITS = {"train": 4, "validation": 2, "test": 1}

  @classmethod
  def make_tree(cls, sample, root):
    tree = fl.openi(sample, root / "tree", report_ids=("1", "2", "4", "6", "9", "14", "32"))
    (root / "archive").mkdir()
    with tarfile.open(root / "archive" / "NLMCXR_reports.tgz", "w:gz") as tar:
      tar.add(tree / "ecgen-radiology", arcname="ecgen-radiology")
    return root / "archive"

  @classmethod
  def layout_splits(cls, root):
    with tarfile.open(root / "NLMCXR_reports.tgz") as tar:
      names = [m.name for m in tar if m.name.endswith(".xml")]
    return _count([_hash_split(pathlib.PurePosixPath(n).stem) for n in names])


class RsnaPneumoniaTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = RsnaBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["default_64"]
  # 10 patients (one DICOM each), split by patientId hash.
  SPLITS = {"train": 6, "validation": 1, "test": 3}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.rsna_pneumonia(sample, root, n=10)

  @classmethod
  def layout_splits(cls, root):
    return _count([_hash_split(p.stem) for p in (root / "stage_2_train_images").glob("*.dcm")])


class CovidxTest(_Harness, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = CovidxBuilder
  BUILDER_CONFIG_NAMES_TO_TEST = ["default_64"]
  # 4 COVID-19 patients (1-2 images) and 3 normal + 3 pneumonia images; every 4th patient in
  # the official test file, the rest split by patient hash.
  SPLITS = {"train": 9, "validation": 1, "test": 4}

  @classmethod
  def make_tree(cls, sample, root):
    return fl.covidx(sample, root, n_covid=4, n_other=3)

  @classmethod
  def layout_splits(cls, root):
    def patients(name):
      return [line.split()[0] for line in (root / name).read_text().splitlines() if line]

    return _count(
      [_hash_split(p, two_way=True) for p in patients("train_COVIDx_CXR-3A.txt")]
      + ["test"] * len(patients("test_COVIDx_CXR-3A.txt"))
    )
