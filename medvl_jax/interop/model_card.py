"""The exported folder's README.md: a model card in the Hugging Face form.

YAML front matter (library_name, license, tags, datasets), then: what was trained (the family,
its towers and their sizes), on which data (`config.data.sources`, or its one-source
shorthand) and splits, with which config (export.json holds it whole; the card lists the keys
that define the run) and which code (the git commit of the exporting code, or 'unknown'), the
evaluations the run holds for the exported step, how to load the files in PyTorch (the
family's snippet) and what the model is for. `interop.export` writes it into the temporary
directory with the other files.

Only names (of datasets, splits, metrics, config keys) and numbers go into the card: nothing
of the data itself, so no report text and no patient id.
"""

import dataclasses
import json
import math
import pathlib
import struct
import subprocess
from typing import Any

from absl import logging
import jax
import numpy as np
import yaml

from medvl_jax import paths

FILE = "README.md"
TAGS = ("medvl_jax", "medical-imaging", "chest-x-ray", "radiology", "image-text", "jax")
KIND_MEANING = {"paired": "image + report", "image": "image only", "text": "report only"}


@dataclasses.dataclass(frozen=True)
class FamilyCard:
  """A family's part of the card (`FamilyInterop.card` returns it).

  Attributes:
    title: the card's heading, e.g. 'ConVIRT image-text encoders (ResNet + BERT)'.
    tags: tags added to the common ones (TAGS).
    towers: {'image': ..., 'text': ...}: each exported tower's architecture and sizes, one line.
    pytorch: Python code that loads the exported files from the folder `out` (its first line
      sets `out`).
  """

  title: str
  tags: tuple[str, ...]
  towers: dict[str, str]
  pytorch: str


# ----------------------------------------------------------------------------- facts
def code_commit() -> str:
  """The git commit of the running medvl_jax code ('<sha> (with uncommitted changes)' when its
  checkout differs from it), or 'unknown' where that is not known: an installed copy (not the
  top of a git checkout) or no git."""
  root = pathlib.Path(__file__).resolve().parents[2]

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()

  try:
    if pathlib.Path(git("rev-parse", "--show-toplevel")).resolve() != root:
      return "unknown"  # e.g. site-packages inside some other repository's .venv
    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return f"{commit} (with uncommitted changes)" if changed else commit


def training_sources(config: Any) -> list[dict[str, Any]]:
  """config.data.sources as rows (name, builder_config, split, kind, weight); the one-source
  shorthand (data.name, data.builder_config, data.train_split, paired) when there are none."""
  entries = config.data.sources
  if not entries:
    d = config.data
    return [dict(name=d.name, builder_config=d.builder_config, split=d.train_split, kind="paired")]
  keys = ("name", "builder_config", "split", "kind", "weight")
  return [{k: dict(e)[k] for k in keys if k in dict(e)} for e in entries]


def _records(path: str):
  """The records of a TFRecord file (length, its CRC, data, its CRC); a torn last one ends."""
  data = paths.read_bytes(path)
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    if pos + 12 + n + 4 > len(data):
      return
    yield data[pos + 12 : pos + 12 + n]
    pos += 12 + n + 4


def logged_metrics(workdir: str | pathlib.Path, step: int) -> dict[str, float]:
  """The evaluation scalars training logged to TensorBoard at `step`: validation metrics
  (val_*) and those of `config.evaluators` (task/metric); a resumed run's later values win.
  Read with TensorBoard's protos, without TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  logdir = paths.join(workdir, "tensorboard")
  files = [
    paths.join(logdir, *rel.split("/"))
    for rel in paths.files(logdir)
    if paths.name(rel).startswith("events.out.tfevents.")
  ]
  files.sort(key=paths.mtime)
  out = {}
  for f in files:
    for record in _records(f):
      event = event_pb2.Event.FromString(record)
      if event.step != step:
        continue
      for v in event.summary.value:
        evaluation = v.tag.startswith("val_") or ("/" in v.tag and not v.tag.startswith("_"))
        if evaluation and v.HasField("tensor"):
          value = tensor_util.make_ndarray(v.tensor)
          if value.shape == ():
            out[v.tag] = float(value)
  return out


def evaluations(workdir: str | pathlib.Path, step: int) -> list[tuple[str, dict[str, Any]]]:
  """(metrics.json path relative to `workdir`, its metrics) of each `python -m
  medvl_jax.evaluate` output under <workdir>/eval/ for checkpoint `step`, by path."""
  out = []
  eval_dir = paths.join(workdir, "eval")
  names = paths.listdir(eval_dir) if paths.isdir(eval_dir) else []
  for name in names:
    path = paths.join(eval_dir, name, "metrics.json")
    if not paths.isfile(path):
      continue
    try:
      result = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
      logging.warning("model card: %s left out: %s", path, e)
      continue
    if result.get("step") == step and isinstance(result.get("metrics"), dict):
      out.append((f"eval/{name}/metrics.json", result["metrics"]))
  return out


def parameter_count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


TEXT_POOLING = {
  "max": "the max over the non-padding tokens of the last hidden states",
  "mean": "the mean over the non-padding tokens of the last hidden states",
  "cls": "the [CLS] token's last hidden state",
}


def bert_tower(bert_config: Any, max_length: int, pooling: str) -> str:
  """One line on a BERT text tower (a `models.bert.BertConfig`; `pooling` in TEXT_POOLING)."""
  c = bert_config
  return (
    f"BERT (Hugging Face `BertModel`): {c.num_layers} layers, hidden {c.hidden_size}, "
    f"{c.num_heads} heads, vocabulary {c.vocab_size}, at most {max_length} tokens; "
    f"h_u = {TEXT_POOLING[pooling]}"
  )


def heads_line(params: Any) -> str:
  """The projection heads' sizes, e.g. 'image 2048 -> 512 -> 512, text 768 -> 512 -> 512'."""
  parts = []
  for side in ("image", "text"):
    head = params[f"{side}_proj"]
    d_in, hidden = np.shape(head["fc1"]["kernel"])
    parts.append(f"{side} {d_in} -> {hidden} -> {np.shape(head['fc2']['kernel'])[1]}")
  return "z = fc2(relu(fc1(h))) per tower: " + ", ".join(parts)


# ----------------------------------------------------------------------------- text
def _number(value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return "n/a"
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return f"{value:.4g}"


def _count(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
  rows = []
  for name, value in metrics.items():
    if name.endswith(("_ci_lo", "_ci_hi")) or isinstance(value, (dict, list)):
      continue
    cell = _number(value)
    lo, hi = metrics.get(f"{name}_ci_lo"), metrics.get(f"{name}_ci_hi")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
      cell += f" [{_number(lo)}, {_number(hi)}]"
    rows.append(f"| {name} | {cell} |")
  return rows


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _metric_table(intro: str, metrics: dict[str, Any]) -> list[str]:
  return [intro, "", "| metric | value |", "|---|---|", *_metric_rows(metrics), ""]


# ----------------------------------------------------------------------------- sections
def _front_matter(family: FamilyCard, sources: list[dict[str, Any]]) -> list[str]:
  front = {
    "library_name": "medvl_jax",
    "license": "unknown",  # the training data's terms apply; see the Licence section
    "pipeline_tag": "feature-extraction",
    "tags": list(dict.fromkeys(TAGS + family.tags)),
    "datasets": list(dict.fromkeys(f"{s['name']}/{s['builder_config']}" for s in sources)),
  }
  return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]


def _model(family: FamilyCard, params: Any, model_cfg: Any) -> list[str]:
  image, text = parameter_count(params["image"]), parameter_count(params["text"])
  heads = parameter_count({k: params[k] for k in ("image_proj", "text_proj")})
  rest = parameter_count(params) - image - text - heads
  lines = ["## Model", ""]
  lines += _table(
    ("part", "files", "architecture", "parameters"),
    [
      ("image tower", "`image_encoder/`", family.towers["image"], _count(image)),
      ("text tower", "`text_encoder/`", family.towers["text"], _count(text)),
      ("projection heads", "`projection_heads.safetensors`", heads_line(params), _count(heads)),
    ],
  )
  lines.append("")
  if rest:
    lines += [f"Not exported: {_count(rest)} parameters that serve pretraining only.", ""]

  def source(init: str) -> str:
    return f"the checkpoint `{pathlib.PurePath(init).name}`" if init else "random"

  lines += [
    f"Initialisation: image tower {source(model_cfg.image.init)}, text tower "
    f"{source(model_cfg.text.init)} (`model.image.init`, `model.text.init`).",
    "",
  ]
  return lines


def _data(sources: list[dict[str, Any]], data_cfg: Any) -> list[str]:
  rows = [
    (
      f"`{s['name']}`",
      f"`{s['builder_config']}`",
      f"`{s['split']}`",
      f"{s['kind']} ({KIND_MEANING.get(s['kind'], s['kind'])})",
      _number(s.get("weight", 1.0)),
    )
    for s in sources
  ]
  return [
    "## Training data",
    "",
    *_table(("dataset", "builder config", "split", "kind", "weight"), rows),
    "",
    "`weight`: the share of each global batch drawn from the source. Validation: split "
    f"`{data_cfg.eval_split}` of `{data_cfg.name}/{data_cfg.builder_config}`. Splits are the "
    "datasets' own, by patient.",
    "",
  ]


def _training(config: Any, step: int, commit: str) -> list[str]:
  loss, opt = config.loss, config.optimizer
  numeric = {k: v for k, v in loss.items() if isinstance(v, (int, float)) and type(v) is not bool}
  settings = ", ".join(f"{k} {_number(v)}" for k, v in numeric.items())
  rows = [
    ("steps", f"{step} (`total_steps` {config.total_steps})"),
    ("global batch size", config.batch_size),
    ("loss", f"`{loss.name}`" + (f" ({settings})" if settings else "")),
    (
      "optimizer",
      f"lr {_number(opt.lr)}, weight decay {_number(opt.weight_decay)}, schedule `{opt.schedule}`",
    ),
    ("seed", config.seed),
    ("compute dtype", f"`{config.model.dtype}`"),
    ("code (git commit at export)", commit),
  ]
  return [
    "## Training",
    "",
    *_table(("setting", "value"), rows),
    "",
    "The whole training config is `config` in `export.json` (the run's `config.json`).",
    "",
  ]


def _evaluation(workdir: str, step: int, eval_split: str) -> list[str]:
  lines = ["## Evaluation", ""]
  logged, found = logged_metrics(workdir, step), evaluations(workdir, step)
  if logged:
    intro = f"Logged by training at step {step} (validation split `{eval_split}`):"
    lines += _metric_table(intro, logged)
  for path, metrics in found:
    intro = f"`python -m medvl_jax.evaluate` (`{path}`; 95% CIs in brackets):"
    lines += _metric_table(intro, metrics)
  if not logged and not found:
    lines += [
      f"None recorded for step {step}: no evaluation was logged at this step, and the run "
      "holds no `python -m medvl_jax.evaluate` output for it (`eval/`).",
      "",
    ]
  return lines


def _usage(family: FamilyCard) -> list[str]:
  return [
    "## Use in PyTorch",
    "",
    "```python",
    family.pytorch.rstrip(),
    "```",
    "",
    "`export.json` states the rest: the image preprocessing (`image_preprocessing`), the "
    "pooling of each tower (`pooling`) and the embedding math (`embedding`).",
    "",
  ]


USE_AND_LICENCE = [
  "## Intended use and limitations",
  "",
  "* For research on image-text representation learning for chest X-rays (retrieval, linear "
  "probes, fine-tuning, comparison of pretraining methods).",
  "* **Not for diagnosis, triage or any clinical decision.** The model is not a medical device "
  "and has not been validated clinically.",
  "* It learned from the data above only and inherits its biases (institutions, scanners, "
  "patient populations, reporting style, English reports); how it behaves on other data is "
  "unknown.",
  "* Runs on small samples (such as the bundled sample) demonstrate the pipeline; they do not "
  "give useful encoders.",
  "",
  "## Licence",
  "",
  "The weights derive from the training data above, whose terms apply (each dataset's card in "
  '`data_pipelines/<dataset>/README.md`, "License and access"); this card grants no licence of '
  "its own (`license: unknown`).",
  "",
]


def render(
  family: FamilyCard,
  params: Any,
  config: Any,
  step: int,
  workdir: str,
  commit: str,
) -> str:
  """The card's text for checkpoint `step` (whose `params` are exported) of the run in
  `workdir`; `commit` is `code_commit()`."""
  sources = training_sources(config)
  intro = [
    f"# {family.title}",
    "",
    f"Image and text encoders of a `{config.model.name}` model (medvl_jax), exported for "
    f"PyTorch from checkpoint **step {step}** (of `total_steps` {config.total_steps}) of the "
    f"run `{paths.name(workdir)}`.",
    "",
  ]
  return "\n".join(
    _front_matter(family, sources)
    + intro
    + _model(family, params, config.model)
    + _data(sources, config.data)
    + _training(config, step, commit)
    + _evaluation(workdir, step, config.data.eval_split)
    + _usage(family)
    + USE_AND_LICENCE
  )


def write(out_dir: pathlib.Path, text: str) -> None:
  (out_dir / FILE).write_text(text)
