"""The documentation against the tree it describes.

README.md is a front page: short, with the two fresh-machine commands near the top, and a stage
map whose every path exists. Every relative link of the pages resolves. The commands of the
pages still work: a fenced block right after a `<!-- doc-test -->` line is run as written
(cheap commands only: `--help`, dry runs); every other command of our CLIs has its flags
checked against the CLI's own help, and its `--config.*` keys against the config it names.
"""

from collections.abc import Iterator
import concurrent.futures
import functools
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300
COMMANDS_WITHIN = 40  # lines of the README that hold both fresh-machine commands
DOC_TEST = "<!-- doc-test -->"
TIMEOUT = 120  # seconds per doc-tested command; they finish in seconds
# CLIs whose flags are checked; other commands in the pages (pip, pytest, hf, ...) are not ours.
OUR_MODULES = ("medvl_jax.", "data_pipelines.", "experiments.")
CONFIGS = (REPO / "configs" / "convirt.py", REPO / "configs" / "mixed.py")


def rel(page) -> str:
  return str(page.relative_to(REPO))


# ----------------------------------------------------------------------------- markdown parts
def fenced_blocks(text: str):
  """(language, body, doc_tested) of every fenced code block of a markdown text."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    match = re.match(r"^```(\w*)\s*$", lines[i])
    if not match:
      i += 1
      continue
    start = i + 1
    end = start
    while end < len(lines) and not lines[end].startswith("```"):
      end += 1
    doc_tested = i > 0 and lines[i - 1].strip() == DOC_TEST
    yield match.group(1), "\n".join(lines[start:end]), doc_tested
    i = end + 1


def without_code_blocks(text: str) -> str:
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
  """The body of the `## heading` section, up to the next heading of level 1 or 2."""
  match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
  assert match, f"README.md has no '## {heading}' section"
  return match.group(1)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> Iterator[str]:
  seen: dict[str, int] = {}
  for line in without_code_blocks(page.read_text()).splitlines():
    match = re.match(r"^#{1,6} (.+)$", line)
    if match:
      base = slug(match.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      yield base if n == 0 else f"{base}-{n}"


def commands(body: str) -> list[str]:
  """The commands of a shell block: continuation lines joined, blank lines dropped."""
  return [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]


def page_commands():
  """(page, command, doc_tested) for every command in a shell block of the pages."""
  for page in PAGES:
    for lang, body, doc_tested in fenced_blocks(page.read_text()):
      if lang in ("", "bash", "sh", "shell"):
        for command in commands(body):
          yield page, command, doc_tested


DOC_TESTED = sorted({c for _, c, tested in page_commands() if tested})


# ----------------------------------------------------------------------------- running commands
def argv(command: str) -> list[str]:
  """The command as an argument list: `python` is this interpreter; no shell is involved."""
  args = shlex.split(command, comments=True)
  return [sys.executable if a in ("python", "python3") else a for a in args]


@functools.cache
def run(command: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    argv(command), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False
  )


@pytest.fixture(scope="module")
def doc_test_runs():
  """Every doc-tested command, run once, two at a time (they are mostly Python start-up)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    return dict(zip(DOC_TESTED, pool.map(run, DOC_TESTED)))


def help_flags(module: str, full: bool = False) -> set[str]:
  """Flag names a CLI's help lists (absl: `--name`, `--[no]name`; argparse: `--name`)."""
  proc = run(f"python -m {module} {'--helpfull' if full else '--help'}")
  text = proc.stdout + proc.stderr
  assert "Traceback" not in text, f"`python -m {module} --help` failed:\n{text[-2000:]}"
  return set(re.findall(r"--(?:\[no\])?([A-Za-z_][\w-]*)", text))


def has_flag(module: str, name: str) -> bool:
  if name in ("help", "helpfull", "helpshort"):
    return True

  def listed(flags):
    return name in flags or (name.startswith("no") and name[2:] in flags)

  return listed(help_flags(module)) or listed(help_flags(module, full=True))


# ----------------------------------------------------------------------------- config keys
@functools.cache
def config(path: str, variant: str | None):
  spec = importlib.util.spec_from_file_location(f"_doc_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def has_key(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def config_named_by(flags: list[str]) -> list[tuple[str, str | None]]:
  """(file, variant) of a command's `--config=FILE[:VARIANT]`; both configs when it has none
  or a placeholder (`--config=...`)."""
  for flag in flags:
    if flag.startswith("--config="):
      path, _, variant = flag.split("=", 1)[1].partition(":")
      if (REPO / path).is_file():
        return [(str(REPO / path), variant or None)]
  return [(str(path), None) for path in CONFIGS]


def unknown_config_keys(flags: list[str]) -> list[str]:
  configs = [config(path, variant) for path, variant in config_named_by(flags)]
  keys = [f.split("=", 1)[0][len("--config.") :] for f in flags if f.startswith("--config.")]
  keys = [k for k in keys if re.fullmatch(r"[a-z_][\w.]*", k)]  # not `--config.<key>=...`
  return [k for k in keys if not any(has_key(c, k) for c in configs)]


# ----------------------------------------------------------------------------- what a command is
def parse(command: str):
  """(checker, flags) of a command that runs one of our CLIs or launchers, else None.

  checker(name) says whether the CLI accepts `--name`. Launchers pass their trailing
  arguments to the main job, so those are checked as its flags.
  """
  tokens = [t.strip("[]") for t in shlex.split(command, comments=True)]
  while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
    tokens.pop(0)
  if len(tokens) >= 3 and tokens[0] in ("python", "python3") and tokens[1] == "-m":
    module = tokens[2]
    if not module.startswith(OUR_MODULES):
      return None
    return functools.partial(has_flag, module), [t for t in tokens[3:] if t.startswith("--")]
  script = next((t for t in tokens if t.startswith("launch/")), None)
  if script is None:
    return None
  assert (REPO / script).is_file(), f"{script} does not exist"
  rest = tokens[tokens.index(script) + 1 :]
  if script.endswith("tpu_pod.sh"):
    text = (REPO / script).read_text()
    own = []
    while rest and rest[0].startswith("--"):
      own.append(rest.pop(0))
    missing = [
      f for f in own if not re.search(rf"^\s*{re.escape(f.split('=')[0])}[=)]", text, re.M)
    ]
    assert not missing, f"{script} has no option {missing}"
    rest = rest[1:]  # STEP
  elif script.endswith("local_multihost.sh"):
    rest = rest[1:]  # NUM_PROCESSES
  return functools.partial(has_flag, "medvl_jax.main"), [t for t in rest if t.startswith("--")]


# ----------------------------------------------------------------------------- tests
def test_readme_is_a_front_page():
  lines = README.read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most 300)"
  for marker in ("main-command", "test-command"):
    closing = [i for i, line in enumerate(lines, 1) if line.strip() == f"<!-- /{marker} -->"]
    assert closing, f"README.md has no <!-- /{marker} --> marker"
    assert closing[0] <= COMMANDS_WITHIN, (
      f"README.md: the {marker} ends on line {closing[0]}, after line {COMMANDS_WITHIN}"
    )


def stage_map_paths() -> list[str]:
  """The paths in the 'where' column of the README's stage map table."""
  rows = [
    line for line in section(README.read_text(), "Stage map").splitlines() if line.startswith("|")
  ]
  paths = []
  for row in rows[2:]:  # header and separator rows first
    where = row.split("|")[2]
    found = re.findall(r"\]\(([^)]+)\)", where) or re.findall(r"`([^`]+)`", where)
    assert found, f"README.md stage map: no path in row {row!r}"
    paths += found
  return paths


def test_stage_map_names_existing_paths():
  paths = stage_map_paths()
  assert len(paths) >= 10, paths
  missing = [p for p in paths if not (REPO / p).exists()]
  assert not missing, f"README.md stage map names paths that do not exist: {missing}"


def test_stage_map_names_every_package():
  named = {p.rstrip("/") for p in stage_map_paths()}
  packages = sorted(
    str(d.relative_to(REPO))
    for d in (REPO / "medvl_jax").iterdir()
    if (d / "__init__.py").is_file()
  )
  left_out = [p for p in packages if p not in named]
  assert not left_out, f"README.md stage map leaves out the packages {left_out}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
  text = without_code_blocks(page.read_text())
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"^[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
      broken.append(f"{target} (no such file)")
    elif anchor and file.suffix == ".md" and anchor not in set(anchors(file)):
      broken.append(f"{target} (no heading with that anchor)")
  assert not broken, f"{rel(page)}: broken links {broken}"


def test_doc_tests_are_marked():
  """The marker is in use, so the doc-tested commands below are not silently none."""
  assert len(DOC_TESTED) >= 5, DOC_TESTED


@pytest.mark.parametrize("command", DOC_TESTED)
def test_doc_tested_command_runs(command, doc_test_runs):
  proc = doc_test_runs[command]
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, f"{command}:\n{out[-3000:]}"
  # absl's --help prints the flags and exits 1; everything else must exit 0.
  ok = proc.returncode == 0 or ("--help" in command and proc.returncode == 1 and "flags:" in out)
  assert ok, f"{command}: exit {proc.returncode}\n{out[-3000:]}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_command_flags_exist(page, doc_test_runs):
  del doc_test_runs  # the help texts, already run and cached
  bad = []
  for where, command, _ in page_commands():
    if where != page:
      continue
    if command.startswith("--"):  # a bare flag line: main-job flags
      parsed = functools.partial(has_flag, "medvl_jax.main"), shlex.split(command, comments=True)
    else:
      parsed = parse(command)
    if parsed is None:
      continue
    accepts, flags = parsed
    names = {f[2:].split("=", 1)[0] for f in flags if not f.startswith("--config.")}
    bad += [f"{command}: --{n} unknown" for n in sorted(names) if not accepts(n)]
    bad += [f"{command}: --config.{k} unknown" for k in unknown_config_keys(flags)]
  assert not bad, f"{rel(page)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_inline_config_flags_exist(page):
  """`--config.a.b=...` written in the pages' prose names a key of a config."""
  text = without_code_blocks(page.read_text())
  flags = [f.split()[0] for f in re.findall(r"`(--config\.[^`]+)`", text)]
  unknown = unknown_config_keys(flags)
  assert not unknown, f"{rel(page)}: unknown config keys {unknown}"
