"""medvl_jax/cli.py in-process: locating an absent config key, and library messages."""

import logging

from absl import logging as absl_logging
import pytest

from medvl_jax import cli


@pytest.fixture(scope="module")
def smoke_config():
  from configs import convirt  # pylint: disable=g-import-not-at-top

  return convirt.get_config("smoke")


@pytest.mark.parametrize(
  "path,want",
  [
    ("batch_sizee", ("batch_sizee", "batch_size")),
    ("optimizer.lrr", ("optimizer.lrr", "optimizer.lr")),
    ("optimizr.lr", ("optimizr", "optimizer")),
    ("model.text.initt", ("model.text.initt", "model.text.init")),
    ("zzzqqq", ("zzzqqq", None)),
    ("seed.x", ("seed.x", None)),  # below a number: nothing to suggest
    ("data.sources[0].weight", ("data.sources[0]", None)),  # the smoke config has no sources
    ("optimizer.lr", None),  # exists
  ],
)
def test_absent_key_is_the_full_dotted_key_with_the_closest_one(smoke_config, path, want):
  assert cli._absent_key(smoke_config, path) == want  # pylint: disable=protected-access


@pytest.fixture
def verbosity():
  saved = absl_logging.get_verbosity()
  yield absl_logging.set_verbosity
  absl_logging.set_verbosity(saved)


def _record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
  return logging.LogRecord("transformers", level, __file__, 1, msg, None, None)


def test_known_library_messages_are_debug_level_only(verbosity):
  noise = "PyTorch was not found. Models won't be available and only tokenizers, ..."
  debug_only = cli._DEBUG_ONLY  # pylint: disable=protected-access
  verbosity(absl_logging.INFO)
  assert not debug_only.filter(_record(noise))
  verbosity(absl_logging.DEBUG)  # --verbosity=1: shown, at debug level
  record = _record(noise)
  assert debug_only.filter(record) and record.levelno == logging.DEBUG
  verbosity(absl_logging.INFO)
  other = _record("PyTorch was found but is too old", logging.ERROR)
  assert debug_only.filter(other) and other.levelno == logging.ERROR  # everything else stays
