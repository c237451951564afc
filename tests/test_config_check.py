"""Early validation: every name and nested choice fails through the real CLI in one line, with
exit status 2, before anything is built or written (no workdir contents, no tfds directory)."""

import ast
import pathlib
import re
import textwrap

import pytest

from tests.conftest import REPO, run_main, smoke_args

CASES = [
  # (override, words the one error line must hold: the key and the valid values)
  ("--config.model.name=nope", ["config.model.name='nope'", "convirt"]),
  ("--config.data.name=nope", ["config.data.name='nope'", "cxr_sample", "nih14"]),
  # A labels-only corpus cannot be pretrained on: refused before the pipeline reads it.
  (
    "--config.data.name=nih14",
    ["config.data.name='nih14'", "no image-text pairs", "cxr_sample, mimic_cxr, openi"],
  ),
  ("--config.data.builder_config=nope", ["config.data.builder_config='nope'", "paired"]),
  ("--config.model.dtype=float8", ["config.model.dtype='float8'", "bfloat16, float32"]),
  (
    "--config.model.image.variant=vit",
    ["config.model.image.variant='vit'", "resnet50, resnet_small, resnet_tiny"],
  ),
  ("--config.loss.name=nope", ["config.loss.name='nope'", "infonce"]),
  (
    "--config.optimizer.schedule=cosine",
    ["config.optimizer.schedule='cosine'", "constant, plateau"],
  ),
  (
    "--config.model.text.tokenizer=/no/such/dir",
    ["config.model.text.tokenizer", "/no/such/dir", "not found"],
  ),
  ("--config.model.image.init=/no/such.pth", ["config.model.image.init", "/no/such.pth"]),
  # Pretrained files stay local paths: a URL is named as one, not as a missing file.
  (
    "--config.model.image.init=gs://bucket/resnet50.pth",
    ["config.model.image.init='gs://bucket/resnet50.pth'", "a URL", "local path"],
  ),
  (
    "--config.model.text.init=gs://bucket/bert",
    ["config.model.text.init='gs://bucket/bert'", "a URL", "local path"],
  ),
  ("--config.data.image_size=300", ["config.data.image_size=300", "config.data.resize=72"]),
  ("--config.total_steps=0", ["config.total_steps=0", "positive"]),
  # Value ranges (issue 14): each was accepted and trained on (loss climbed, went negative, NaN).
  ("--config.optimizer.lr=-0.001", ["config.optimizer.lr=-0.001", "> 0"]),
  ("--config.loss.lam=1.5", ["config.loss.lam=1.5", "[0, 1]"]),
  ("--config.loss.temperature=0", ["config.loss.temperature=0", "> 0"]),
]

EVALUATOR_CASES = [
  (
    "[{'name': 'nope'}]",
    ["config.evaluators[0] name='nope'", "linear_probe, regeneration, retrieval"],
  ),
  (
    "[{'name': 'linear_probe', 'nope': 1}]",
    ["config.evaluators[0] (linear_probe)", "'nope'", "fractions", "seeds"],
  ),
  ("[{'n_boot': 10}]", ["config.evaluators[0]", "no 'name'"]),
]


def _assert_refused(proc, words, workdir: pathlib.Path, tfds_dir: pathlib.Path):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-2000:]
  for w in words:
    assert w in errors[0], f"{w!r} not in {errors[0]!r}"
  assert "Traceback" not in proc.stderr
  # Nothing built or written: no config.json, no checkpoints, no tfds data dir.
  assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.iterdir())
  assert not tfds_dir.exists()


def _case_id(case) -> str:
  key, _, value = case[0].partition("=")
  return f"{key[len('--config.') :]}={value}"


# Through the real CLI (one subprocess each, ~8 s of imports): one registry name, the corpus
# that cannot be pretrained on, one value range. The CLI turns `config_check.check`'s
# ConfigError into the one line; every other case goes through that same function in-process.
CLI_CASES = [
  c for c in CASES if _case_id(c) in {"model.name=nope", "data.name=nih14", "optimizer.lr=-0.001"}
]


@pytest.mark.parametrize("override,words", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_refused_before_anything_is_built(tmp_path, override, words):
  workdir, tfds_dir = tmp_path / "w", tmp_path / "tfds"
  proc = run_main(*smoke_args(workdir, tfds_dir, override))
  _assert_refused(proc, words, workdir, tfds_dir)


def _override(config, override: str) -> None:
  """`--config.a.b=v` as ml_collections' flag parser applies it (a literal where it parses as
  one, else the string), on a copy of the smoke config."""
  key, _, raw = override[len("--config.") :].partition("=")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


@pytest.mark.parametrize("override,words", CASES, ids=[_case_id(c) for c in CASES])
def test_config_check_refuses_each_case_in_one_line(tmp_path, override, words):
  """Every case, in-process: `config_check.check` (the first thing `train_and_evaluate` does,
  before any read or write) raises a ConfigError whose message is one line with the words."""
  from configs import convirt  # pylint: disable=g-import-not-at-top
  from medvl_jax import config_check  # pylint: disable=g-import-not-at-top
  from medvl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  config = convirt.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  _override(config, override)
  with pytest.raises(ConfigError) as raised:
    config_check.check(config)
  message = str(raised.value)
  assert "\n" not in message, message
  for w in words:
    assert w in message, f"{w!r} not in {message!r}"
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
  "evaluators,words", EVALUATOR_CASES, ids=["unknown_name", "unknown_setting", "no_name"]
)
def test_evaluators_refused_before_anything_is_built(tmp_path, evaluators, words):
  """Evaluators are a list (no flag override): a config file of the user's sets them."""
  config_file = tmp_path / "my_config.py"
  config_file.write_text(
    textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(REPO)!r})
      from configs import convirt

      def get_config():
        c = convirt.get_config("smoke")
        c.evaluators = {evaluators}
        return c
      """)
  )
  workdir, tfds_dir = tmp_path / "w", tmp_path / "tfds"
  proc = run_main(
    f"--config={config_file}", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"
  )
  _assert_refused(proc, words, workdir, tfds_dir)


def test_evaluator_settings_match_the_constructors():
  """The signature check accepts every evaluator's own defaults and refuses a typo."""
  import inspect  # pylint: disable=g-import-not-at-top

  from medvl_jax import config_check, evaluate
  from medvl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  for name, cls in evaluate.EVALUATORS.items():
    params = list(inspect.signature(cls).parameters.values())[1:]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    assert defaults, name
    config_check.check_evaluator(name, defaults)
    with pytest.raises(ConfigError, match=rf"\({name}\): unknown setting 'n_bootz'"):
      config_check.check_evaluator(name, dict(defaults, n_bootz=1))


def test_evaluate_cli_checks_cfg_settings_before_restoring(short_run, tmp_path):
  """`--cfg` settings of the evaluation CLI are checked against the evaluator's signature
  before any checkpoint is restored: one line, exit 2, nothing written."""
  from tests.conftest import run_eval

  out = tmp_path / "eval_out"
  proc = run_eval(
    f"--workdir={short_run}", "--task=linear_probe", "--cfg=no_such_setting=1", f"--out={out}"
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1]
  assert "unknown setting 'no_such_setting'" in last and "fractions" in last, last
  assert "Traceback" not in proc.stderr
  assert not out.exists()


# ----------------------------------------------------------------------------- the schema
def _config_modules():
  from configs import convirt, mixed  # pylint: disable=g-import-not-at-top

  return {"convirt": convirt, "mixed": mixed}


def _variants(module) -> list[str | None]:
  """None and every variant a config file names when asked for an unknown one."""
  with pytest.raises(ValueError) as raised:
    module.get_config("no_such_variant")
  named = re.findall(r"'(\w+)'", str(raised.value).partition("valid:")[2])
  assert named, str(raised.value)
  return [None, *named]


CONFIG_VARIANTS = [
  (name, variant) for name, module in _config_modules().items() for variant in _variants(module)
]


def _flat_keys(tree, prefix: str = "") -> set[str]:
  keys = set()
  for k, v in tree.items():
    keys.add(f"{prefix}{k}")
    if isinstance(v, dict):
      keys |= _flat_keys(v, f"{prefix}{k}.")
  return keys


@pytest.mark.parametrize(
  "name,variant", CONFIG_VARIANTS, ids=[f"{n}:{v}" for n, v in CONFIG_VARIANTS]
)
def test_every_schema_key_is_in_every_config_variant(name, variant):
  """Every required, resumable and checked key is a key of each variant of both config files,
  and each default there passes its check."""
  from medvl_jax import config_check  # pylint: disable=g-import-not-at-top

  config = _config_modules()[name].get_config(variant)
  keys = _flat_keys(config.to_dict())
  for declared in ("REQUIRED_KEYS", "RESUMABLE_KEYS", "CHECKED_KEYS"):
    missing = [k for k in getattr(config_check, declared) if k not in keys]
    assert not missing, f"{declared}: configs/{name}.py:{variant} lacks {missing}"
  config_check.check_required(config)
  config_check._check_values(config)  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "key", ["data.augment.flip_p", "mesh", "loss.impl", "distributed.initialization_timeout"]
)
def test_missing_key_is_named_in_one_line(tmp_path, key):
  from configs import convirt  # pylint: disable=g-import-not-at-top
  from medvl_jax import config_check  # pylint: disable=g-import-not-at-top
  from medvl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  config = convirt.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  del node[leaf]
  with pytest.raises(ConfigError, match=rf"^config\.{re.escape(key)} is missing$"):
    config_check.check(config)
  assert not (tmp_path / "tfds").exists()


def test_config_file_without_a_key_refused_before_start_up(tmp_path):
  """A config file of the user's that lacks a key: one line through the real CLI, before the
  multi-process start-up (which reads config.distributed) and before anything is built."""
  config_file = tmp_path / "my_config.py"
  config_file.write_text(
    textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(REPO)!r})
      from configs import convirt

      def get_config():
        c = convirt.get_config("smoke")
        del c["distributed"]
        return c
      """)
  )
  workdir, tfds_dir = tmp_path / "w", tmp_path / "tfds"
  proc = run_main(
    f"--config={config_file}", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"
  )
  _assert_refused(proc, ["config.distributed.initialization_timeout is missing"], workdir, tfds_dir)


# The library reads config keys directly: their defaults live in configs/*.py, and a run's
# config.json that lacks one is filled in by medvl_jax.ckpt.run_dir.load_run_config.
_CONFIG_NAME = re.compile(r"(config|cfg)$")


def _root(node: ast.AST) -> str | None:
  while isinstance(node, ast.Attribute | ast.Subscript):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def _config_names(tree: ast.AST) -> set[str]:
  """Names that hold a config: `config`, `cfg`, `model_cfg`, ..., and any name assigned a part
  of one (`data = config.data`)."""
  names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and _CONFIG_NAME.search(n.id)}
  names |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg) and _CONFIG_NAME.search(a.arg)}
  while True:
    more = {
      t.id
      for n in ast.walk(tree)
      if isinstance(n, ast.Assign)
      and isinstance(n.value, ast.Attribute | ast.Subscript | ast.Name)
      and _root(n.value) in names
      for t in n.targets
      if isinstance(t, ast.Name) and t.id not in names
    }
    if not more:
      return names
    names |= more


def config_reads_with_default(source: str) -> list[str]:
  """`config.get(...)`, `config.data.get(...)`, `getattr(config, k, default)` in `source`."""
  tree = ast.parse(source)
  names = _config_names(tree)
  found = []
  for n in ast.walk(tree):
    if not isinstance(n, ast.Call):
      continue
    f = n.func
    if isinstance(f, ast.Attribute) and f.attr == "get" and _root(f.value) in names:
      found.append(f"line {n.lineno}: {ast.unparse(n)}")
    elif isinstance(f, ast.Name) and f.id == "getattr" and len(n.args) == 3:
      if _root(n.args[0]) in names:
        found.append(f"line {n.lineno}: {ast.unparse(n)}")
  return found


def test_config_reads_with_default_are_found():
  """The scan finds each form (also through a name that holds a part of the config) and
  leaves other mappings alone."""
  source = textwrap.dedent("""\
    def f(config, model_cfg, env, metrics):
      data = config.data
      env.get("HOME")
      metrics.get("loss", 0.0)
      config.mesh
      config.get("mesh", 1)
      data.get("sources")
      model_cfg.image.get("conv_impl")
      getattr(config.loss, "impl", "gather")
    """)
  found = config_reads_with_default(source)
  assert [f.split(":")[0] for f in found] == ["line 6", "line 7", "line 8", "line 9"], found


def test_library_reads_config_keys_directly():
  offenders = []
  for path in sorted((REPO / "medvl_jax").rglob("*.py")):
    for hit in config_reads_with_default(path.read_text()):
      offenders.append(f"{path.relative_to(REPO)} {hit}")
  assert not offenders, "\n".join(offenders)
