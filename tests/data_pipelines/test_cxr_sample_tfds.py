"""The bundled-sample builder under tfds's own harness, `tfds.testing.DatasetBuilderTestCase`.

The dummy tree `data_pipelines/cxr_sample/dummy_data/` has the sample's layout (real rows and
real images, downscaled; see its README): the harness passes it as `manual_dir`, builds each
config, reads every split back, checks the features' shapes and dtypes, that no example is in
two splits, the counts below, a reload from disk, and the default config. Patient ids were
chosen so that the patient hash puts 3 / 1 / 1 kept examples in train / validation / test;
one row per config is bad (an image file left out, a report with no text) and is skipped.
`nih_halves` reads the `image_only` rows: 1 / 4 kept examples in pretrain / probe.
"""

import tensorflow_datasets as tfds

from data_pipelines.cxr_sample import Builder

SPLITS = {"train": 3, "validation": 1, "test": 1}


class PairedTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["paired"]
  SPLITS = SPLITS
  SKIP_CHECKSUMS = True  # Nothing is downloaded: the data is read from manual_dir.


class TextOnlyTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["text_only"]
  SPLITS = SPLITS
  SKIP_CHECKSUMS = True


class ImageOnlyTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["image_only"]
  SPLITS = SPLITS
  SKIP_CHECKSUMS = True


class NihHalvesTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["nih_halves"]
  SPLITS = {"pretrain": 1, "probe": 4}  # The image_only rows: patient 100 -> pretrain.
  SKIP_CHECKSUMS = True


# ----------------------------------------------------------------------------- conventions
DUMMY = Builder.code_path.parent / "dummy_data"


def test_citation_and_card_come_from_the_package_files(tmp_path):
  info = Builder(config="paired", data_dir=str(tmp_path)).info
  for key in (
    "cohen2020covid,",
    "cohen2020covidProspective,",
    "demner2016preparing,",
    "wang2017chestxray8,",
  ):
    assert key in info.citation
  assert "arXiv:2003.11597" in info.citation and "arXiv:2006.11988" in info.citation
  assert info.description == (DUMMY.parent / "README.md").read_text(encoding="utf-8").strip()


def test_dummy_rows_that_are_bad_are_skipped_and_counted(tmp_path):
  expected = {"paired": {"missing_image": 1}, "text_only": {"empty_text": 1}}
  for config, skipped in expected.items():
    b = Builder(config=config, data_dir=str(tmp_path))
    b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY), try_download_gcs=False)
    )
    assert dict(b.info.metadata["skipped"]) == skipped
    assert {k: v.num_examples for k, v in b.info.splits.items()} == SPLITS
