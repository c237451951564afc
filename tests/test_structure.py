"""The intended import directions, on the real import graph (grimp, as import-linter builds it;
imports inside functions count too)."""

import ast
import itertools
import pathlib
import subprocess
import sys

import grimp
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def graph():
  return grimp.build_graph("medvl_jax", "data_pipelines")


def _chain(graph, importer: str, imported: str):
  return graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)


@pytest.mark.parametrize(
  "importer,imported",
  [
    ("medvl_jax.models", "medvl_jax.interop"),  # models parse HF config.json themselves
    ("medvl_jax.models", "medvl_jax.ckpt.run_dir"),
    ("medvl_jax.models", "medvl_jax.train.loop"),
    ("medvl_jax.models", "medvl_jax.evaluate"),
    ("medvl_jax.models", "medvl_jax.export"),
    ("medvl_jax.evaluate", "medvl_jax.export"),  # runs are read through medvl_jax.ckpt.run_dir
    ("medvl_jax.evaluate", "medvl_jax.train.loop"),
    ("medvl_jax.ckpt.run_dir", "medvl_jax.export"),
    ("medvl_jax.ckpt.run_dir", "medvl_jax.evaluate"),
    ("medvl_jax.interop", "medvl_jax.train.loop"),
    ("medvl_jax.interop", "medvl_jax.evaluate"),
    ("medvl_jax.interop", "medvl_jax.export"),  # the library never imports its CLI
    ("medvl_jax.ckpt.checkpoint", "medvl_jax.interop"),
    ("medvl_jax.families", "medvl_jax.interop"),  # the training contract holds no weights I/O
  ],
)
def test_no_import_in_this_direction(graph, importer, imported):
  assert _chain(graph, importer, imported) is None


def test_run_reading_has_one_owner(graph):
  """export and the evaluate CLI both read runs through medvl_jax.ckpt.run_dir."""
  assert "medvl_jax.ckpt.run_dir" in graph.find_modules_directly_imported_by(
    "medvl_jax.interop.export"
  )
  assert "medvl_jax.ckpt.run_dir" in graph.find_modules_directly_imported_by(
    "medvl_jax.evaluate.runs"
  )


def test_no_import_cycle(graph):
  """No two modules of medvl_jax reach each other (a package's own submodules aside)."""
  mods = sorted(m for m in graph.modules if m.startswith("medvl_jax"))
  cycles = []
  for a, b in itertools.combinations(mods, 2):
    if a.startswith(b + ".") or b.startswith(a + "."):
      continue  # a package and its own submodule (e.g. `interop` re-exporting `mapping`)
    if graph.chain_exists(a, b) and graph.chain_exists(b, a):
      cycles.append((a, b))
  assert cycles == []


def test_interop_init_is_a_small_public_surface():
  """`interop/__init__.py` re-exports; the logic lives in named modules."""
  tree = ast.parse((REPO / "medvl_jax" / "interop" / "__init__.py").read_text())
  defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
  assert defs == []
  from medvl_jax import interop  # pylint: disable=g-import-not-at-top
  from medvl_jax.interop import mapping  # pylint: disable=g-import-not-at-top

  assert interop.to_torch is mapping.to_torch and interop.from_torch is mapping.from_torch


def test_lint_imports_contracts_hold():
  """The repo's import-linter contracts (.importlinter), as `.ci/run` checks them."""
  exe = pathlib.Path(sys.executable).parent / "lint-imports"
  if not exe.exists():
    pytest.skip("import-linter not installed (extra 'test')")
  proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "0 broken" in proc.stdout
