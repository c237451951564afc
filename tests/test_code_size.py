"""Limits that keep the package readable: a short top level, short modules, short signatures."""

import ast

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "medvl_jax"
MAX_TOP_LEVEL_MODULES = 8  # `ls medvl_jax`: the stages are packages, not flat modules
MAX_MODULE_LINES = 500
MAX_PARAMETERS = 10
# Settings constructors: an evaluator's keyword arguments are its config settings
# (`config.evaluators` entries, checked by name against this signature), so they may be many.
SETTINGS_CONSTRUCTORS = {"Evaluator.__init__"}


def _modules():
  return sorted(PACKAGE.rglob("*.py"))


def _functions(tree: ast.AST):
  """(qualified name, node) of every function, methods as Class.method."""
  stack = [(tree, "")]
  while stack:
    node, prefix = stack.pop()
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield f"{prefix}{child.name}", child
        stack.append((child, f"{prefix}{child.name}."))
      elif isinstance(child, ast.ClassDef):
        stack.append((child, f"{prefix}{child.name}."))
      else:
        stack.append((child, prefix))


def _parameter_count(fn: ast.FunctionDef) -> int:
  a = fn.args
  return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def test_top_level_is_short():
  modules = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_no_module_is_long():
  long = {
    str(p.relative_to(REPO)): n
    for p in _modules()
    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
  }
  assert long == {}


def test_no_function_has_many_parameters():
  many = []
  for path in _modules():
    for name, fn in _functions(ast.parse(path.read_text())):
      n = _parameter_count(fn)
      if n > MAX_PARAMETERS and name not in SETTINGS_CONSTRUCTORS:
        many.append(f"{path.relative_to(REPO)}:{fn.lineno} {name} ({n} parameters)")
  assert many == []


@pytest.mark.parametrize(
  "source,expected",
  [
    ("def f(a, b, *c, d, **e): pass", 5),
    ("class C:\n  def m(self, /, a, *, b=1): pass", 3),
  ],
)
def test_parameter_count(source, expected):
  (_, fn), *_ = list(_functions(ast.parse(source)))
  assert _parameter_count(fn) == expected
