"""The run's tokenizer: where it is found, loading it (errors name the path), tokenising batches
with the bundled MiniLM tokenizer."""

import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import DataError
from tests.conftest import REPO
from tests.data.sample import TOKENIZER_DIR


def test_directory_is_the_tokenizer_else_the_text_checkpoint():
  text = ml_collections.ConfigDict({"tokenizer": "/tok", "init": "/bert"})
  assert tokenizer_lib.directory(text) == "/tok"
  text.tokenizer = ""
  assert tokenizer_lib.directory(text) == "/bert"
  text.init = ""
  assert tokenizer_lib.directory(text) == ""


def test_from_config_loads_the_run_tokenizer():
  config = ml_collections.ConfigDict({"model": {"text": {"tokenizer": "", "init": ""}}})
  config.model.text.init = str(TOKENIZER_DIR)
  assert tokenizer_lib.from_config(config).is_fast


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(DataError, match="no_such_tokenizer"):
    tokenizer_lib.load(tmp_path / "no_such_tokenizer")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty"):
    tokenizer_lib.load(tmp_path / "empty")


def test_tokenize_pads_and_blanks_rows_without_text(tokenizer):
  batch = {
    "text": np.array([b"no acute cardiopulmonary process", b"ignored", b""], object),
    "has_text": np.array([True, False, True]),
  }
  out = tokenizer_lib.tokenize(batch, tokenizer, 8)
  assert out is batch and set(out) == {"has_text", "input_ids", "attention_mask"}
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == mask.shape == (3, 8) and ids.dtype == mask.dtype == np.int32
  expected = tokenizer(  # Truncated to 8 tokens: the text is longer.
    "no acute cardiopulmonary process", padding="max_length", truncation=True, max_length=8
  )
  assert ids[0].tolist() == expected["input_ids"] and mask[0].tolist() == expected["attention_mask"]
  assert (ids[1] == tokenizer.pad_token_id).all() and (mask[1] == 0).all()  # No text: blank.
  assert mask[2].tolist() == [1, 1] + [0] * 6  # An empty text: [CLS] [SEP].


def test_importing_the_tokenizer_imports_no_tensorflow():
  # families/ and interop/ find the tokenizer directory here; they must not pull in TensorFlow.
  code = (
    "import sys; from medvl_jax.data import tokenizer; "
    "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]; "
    "assert not bad, bad"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
