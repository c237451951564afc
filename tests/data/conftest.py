"""Fixtures of the data tests: the real sample built once, the bundled MiniLM tokenizer."""

import pathlib

import pytest

from medvl_jax.data import tokenizer as tokenizer_lib
from tests.data.sample import TOKENIZER_DIR
from tests.data_pipelines.test_cxr_sample import sample_tfds_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  return sample_tfds_dir(tmp_path_factory, sample_data_dir)


@pytest.fixture(scope="session")
def tokenizer():
  return tokenizer_lib.load(TOKENIZER_DIR)
