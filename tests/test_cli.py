"""What the command-line tools share: the atomic install of an output directory."""

import pathlib

import pytest

from medvl_jax import cli


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
