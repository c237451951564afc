"""medvl_jax/cli.py in-process: locating an absent config key, library messages, and the atomic
install of an output directory."""

import logging
import pathlib

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


# ----------------------------------------------------------------------------- install_dir
def _tree(d: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def _dir(path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  path.mkdir()
  for name, text in files.items():
    (path / name).write_text(text)
  return path


def _refuse(existing: pathlib.Path) -> None:
  if not (existing / "result.json").is_file():
    raise ValueError(f"{existing}: not ours")


def test_new_or_empty_out_is_replaced(tmp_path):
  tmp = _dir(tmp_path / "out.tmp-1", {"result.json": "new"})
  cli.install_dir(tmp, tmp_path / "out", _refuse)
  assert _tree(tmp_path / "out") == {"result.json": "new"} and not tmp.exists()
  (tmp_path / "empty").mkdir()
  tmp = _dir(tmp_path / "empty.tmp-1", {"result.json": "new"})
  cli.install_dir(tmp, tmp_path / "empty", _refuse)
  assert _tree(tmp_path / "empty") == {"result.json": "new"}


def test_previous_output_is_replaced_and_other_content_refused(tmp_path):
  out = _dir(tmp_path / "out", {"result.json": "old", "stale.txt": "old"})
  cli.install_dir(_dir(tmp_path / "out.tmp-1", {"result.json": "new"}), out, _refuse)
  assert _tree(out) == {"result.json": "new"}
  other = _dir(tmp_path / "other", {"notes.txt": "keep me"})
  tmp = _dir(tmp_path / "other.tmp-1", {"result.json": "new"})
  with pytest.raises(ValueError, match="not ours"):
    cli.install_dir(tmp, other, _refuse)
  assert _tree(other) == {"notes.txt": "keep me"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "other.tmp-1", "out"]


def test_failed_rename_puts_the_previous_output_back(tmp_path):
  """The new directory cannot take the place (here: it is gone): the previous output is
  restored under its name, nothing is set aside, and the error reaches the caller."""
  out = _dir(tmp_path / "out", {"result.json": "old"})
  with pytest.raises(FileNotFoundError):
    cli.install_dir(tmp_path / "out.tmp-gone", out, _refuse)
  assert _tree(out) == {"result.json": "old"}
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
