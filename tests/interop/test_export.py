"""Export to PyTorch / Hugging Face: a real smoke run, the real CLI, real torch models.

The JAX reference is `ConVIRT.apply(..., train=False)` on the checkpoint restored by Orbax; the
PyTorch side is torchvision's ResNet code, `transformers.AutoModel` and the exported heads.
"""

import csv
import json
import pathlib
import re
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from medvl_jax import families
from medvl_jax.ckpt import checkpoint
from medvl_jax.ckpt import run_dir as run_dir_lib
from medvl_jax.errors import CheckpointError, WeightsError
from medvl_jax.interop import export
from medvl_jax.losses import contrastive
from tests.conftest import REPO, SHORT_STEPS, run_export
from tests.interop.test_model_card import card_snippet, check_card, read_card

torch = pytest.importorskip("torch", reason="export is checked against PyTorch (extra 'torch')")
torchvision = pytest.importorskip(
  "torchvision", reason="the image tower is checked against torchvision (extra 'torch')"
)
transformers = pytest.importorskip(
  "transformers", reason="the text tower is checked against transformers"
)
from PIL import Image  # noqa: E402  # pylint: disable=g-import-not-at-top,g-bad-import-order
from safetensors.torch import load_file  # noqa: E402  # pylint: disable=g-import-not-at-top

ATOL = 1e-4  # Absolute, on the fp32 projections (smoke run: |z_v| <~ 0.3, |z_u| <~ 2).
STEPS = SHORT_STEPS
DOCS = REPO / "docs" / "export.md"


def leftovers(parent: pathlib.Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def tiny_torchvision_resnet(stage_sizes=(1, 1, 1, 1), width=8):
  """torchvision's ResNet/Bottleneck code at the smoke model's width.

  torchvision's constructor fixes the stem at 64 channels and the block outputs at
  256 * 2**i (`width_per_group` changes only the inner 3x3 width), so the width-8 smoke model
  is assembled from the same classes with `_make_layer`, as `ResNet.__init__` does.
  """
  from torchvision.models.resnet import Bottleneck, ResNet  # pylint: disable=g-import-not-at-top

  model = ResNet(Bottleneck, list(stage_sizes))
  model.inplanes = width
  model.conv1 = torch.nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
  model.bn1 = torch.nn.BatchNorm2d(width)
  make_layer = model._make_layer  # pylint: disable=protected-access
  for i, blocks in enumerate(stage_sizes):
    setattr(
      model,
      f"layer{i + 1}",
      make_layer(Bottleneck, width * 2**i, blocks, stride=1 if i == 0 else 2),
    )
  return model


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(short_run) -> pathlib.Path:
  return short_run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("exports") / "smoke"
  proc = run_export(f"--workdir={run_dir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step {STEPS}" in proc.stdout
  return out


@pytest.fixture(scope="module")
def jax_model(run_dir):
  """(apply_fn, config) of the JAX model on the checkpoint as restored by Orbax."""
  config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
  model = families.get(config.model.name).build(config.model)
  mngr = checkpoint.manager(run_dir, read_only=True)
  state = mngr.restore(mngr.latest_step())["state"]
  mngr.close()
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  apply = jax.jit(lambda images, ids, mask: model.apply(variables, images, ids, mask, train=False))
  return apply, config


@pytest.fixture(scope="module")
def sample_pairs(sample_data_dir) -> tuple[list[pathlib.Path], list[str]]:
  """Real images and their real notes; notes of differing lengths so that padding matters."""
  root = sample_data_dir / "covid_cxr_notes"
  with open(root / "pairs.csv", newline="") as f:
    rows = sorted(
      (r for r in csv.DictReader(f) if r["clinical_notes"].strip()),
      key=lambda r: len(r["clinical_notes"]),
    )
  # 20 to ~100 characters: below and around the smoke model's 32 tokens.
  rows = [rows[i] for i in np.linspace(0, len(rows) // 4, 5).astype(int)]
  return [root / r["image_file"] for r in rows], [r["clinical_notes"] for r in rows]


def eval_pixels(path: pathlib.Path, pre: dict) -> np.ndarray:
  """uint8 [S, S] as in the docs: PIL grayscale, resize shorter side, central crop."""
  t = torchvision.transforms
  image = Image.open(path).convert("L")
  return np.asarray(t.CenterCrop(pre["crop_size"])(t.Resize(pre["resize"])(image)))


# ----------------------------------------------------------------------------- layout
def test_export_layout_and_metadata(exported, run_dir):
  assert leftovers(exported.parent) == []
  meta = json.loads((exported / "export.json").read_text())
  assert meta["step"] == STEPS and meta["source_workdir"] == str(run_dir.absolute())
  assert meta["config"] == json.loads((run_dir / "config.json").read_text())
  assert {"jax", "flax", "transformers", "torch"} <= set(meta["versions"])
  assert "max over non-padding tokens" in meta["pooling"]
  pre = json.loads((exported / "image_encoder" / "preprocessing.json").read_text())
  assert pre == meta["image_preprocessing"]
  assert (pre["crop_size"], pre["resize"]) == (64, 72)
  assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
  heads = load_file(str(exported / "projection_heads.safetensors"))
  assert {k: tuple(v.shape) for k, v in heads.items()} == {
    "image.fc1.weight": (32, 256),
    "image.fc1.bias": (32,),
    "image.fc2.weight": (32, 32),
    "image.fc2.bias": (32,),
    "text.fc1.weight": (32, 32),
    "text.fc1.bias": (32,),
    "text.fc2.weight": (32, 32),
    "text.fc2.bias": (32,),
  }


def test_torch_models_load_strictly(exported):
  cnn = tiny_torchvision_resnet()
  cnn.fc = torch.nn.Identity()
  state_dict = load_file(str(exported / "image_encoder" / "model.safetensors"))
  assert not any(k.startswith("fc.") for k in state_dict)
  cnn.load_state_dict(state_dict, strict=True)
  assert cnn.layer4[0].bn3.running_var.abs().sum() > 0
  bert, info = transformers.AutoModel.from_pretrained(
    str(exported / "text_encoder"), output_loading_info=True
  )
  assert isinstance(bert, transformers.BertModel)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported / "text_encoder"))
  assert tokenizer("no acute findings")["input_ids"][0] == tokenizer.cls_token_id


# ----------------------------------------------------------------------------- equality
def test_torch_embeddings_equal_jax(exported, jax_model, sample_pairs):
  apply, config = jax_model
  images, sentences = sample_pairs
  pre = json.loads((exported / "image_encoder" / "preprocessing.json").read_text())
  pixels = np.stack([eval_pixels(p, pre) for p in images])  # [N, S, S] uint8
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported / "text_encoder"))
  tokens = tokenizer(
    sentences, padding=True, truncation=True, max_length=config.data.max_length, return_tensors="np"
  )
  ids, mask = tokens["input_ids"], tokens["attention_mask"]
  assert len(set(mask.sum(axis=1))) > 2 and (mask == 0).any()  # real padding, varied lengths

  ref = apply(pixels[..., None], ids.astype(np.int32), mask.astype(np.int32))

  cnn = tiny_torchvision_resnet()
  cnn.fc = torch.nn.Identity()
  cnn.load_state_dict(load_file(str(exported / "image_encoder" / "model.safetensors")))
  bert = transformers.AutoModel.from_pretrained(str(exported / "text_encoder")).eval()
  heads = load_file(str(exported / "projection_heads.safetensors"))

  def project(h, k):
    h = torch.relu(h @ heads[f"{k}.fc1.weight"].T + heads[f"{k}.fc1.bias"])
    return h @ heads[f"{k}.fc2.weight"].T + heads[f"{k}.fc2.bias"]

  x = torch.from_numpy(pixels).float()[:, None] / 255
  x = (x.expand(-1, 3, -1, -1) - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(
    pre["std"]
  )[:, None, None]
  with torch.no_grad():
    z_image = project(cnn.eval()(x), "image").numpy()
    hidden = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]
    hidden = hidden.masked_fill(torch.from_numpy(mask)[..., None] == 0, -torch.inf)
    z_text = project(hidden.max(dim=1).values, "text").numpy()

  np.testing.assert_allclose(z_image, np.asarray(ref["image_embed"]), rtol=0, atol=ATOL)
  np.testing.assert_allclose(z_text, np.asarray(ref["text_embed"]), rtol=0, atol=ATOL)
  print(
    f"max |diff| image {np.abs(z_image - ref['image_embed']).max():.2e}, "
    f"text {np.abs(z_text - ref['text_embed']).max():.2e}"
  )


def docs_snippet() -> str:
  text = DOCS.read_text()
  section = text[text.index("## Use the exported weights in PyTorch") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_snippet_runs_and_matches_jax(exported, jax_model, sample_pairs, monkeypatch, capsys):
  apply, config = jax_model
  images, sentences = sample_pairs
  code = docs_snippet()
  code, n_out = re.subn(r'^out = ".*?"', f"out = {str(exported)!r}", code, flags=re.M)
  code, n_in = re.subn(
    r"^image_file, sentence = .*$",
    f"image_file, sentence = {str(images[-1])!r}, {sentences[-1]!r}",
    code,
    flags=re.M,
  )
  assert (n_out, n_in) == (1, 1), "docs/export.md: the snippet's path lines changed"
  # The smoke run's image tower is the width-8 ResNet (see tiny_torchvision_resnet).
  monkeypatch.setattr(torchvision.models, "resnet50", tiny_torchvision_resnet)
  ns = {}
  exec(compile(code, str(DOCS), "exec"), ns)  # pylint: disable=exec-used
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])

  tokens = ns["tokens"]
  ref = apply(
    np.asarray(ns["pixels"])[None, ..., None],
    tokens["input_ids"].numpy().astype(np.int32),
    tokens["attention_mask"].numpy().astype(np.int32),
  )
  np.testing.assert_allclose(ns["z_image"].numpy(), ref["image_embed"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(ns["z_text"].numpy(), ref["text_embed"], rtol=0, atol=ATOL)
  # The normalisation the training loss applies.
  cosine = float(
    np.sum(
      contrastive.l2_normalize(ref["image_embed"]) * contrastive.l2_normalize(ref["text_embed"])
    )
  )
  assert printed == pytest.approx(cosine, abs=ATOL)
  assert (
    config.data.max_length
    == json.loads((exported / "export.json").read_text())["text_preprocessing"]["max_length"]
  )


# ----------------------------------------------------------------------------- model card
def test_model_card(exported, run_dir, sample_data_dir):
  front, body = check_card(exported, run_dir, sample_data_dir)
  assert {"convirt", "resnet", "bert"} <= set(front["tags"])
  assert "| text tower | `text_encoder/` | BERT (Hugging Face `BertModel`): 2 layers" in body
  assert "no `fc`: h_v = the 256-d pooled features" in body


def test_model_card_snippet_loads_the_export(exported, monkeypatch):
  # The smoke run's image tower is the width-8 ResNet; the card says so above its snippet.
  monkeypatch.setattr(torchvision.models, "resnet50", tiny_torchvision_resnet)
  ns = {}
  exec(compile(card_snippet(exported), "README.md", "exec"), ns)  # pylint: disable=exec-used
  weights = load_file(str(exported / "image_encoder" / "model.safetensors"))
  np.testing.assert_array_equal(ns["cnn"].conv1.weight.detach(), weights["conv1.weight"])
  assert isinstance(ns["cnn"].fc, torch.nn.Identity)
  assert isinstance(ns["bert"], transformers.BertModel)
  assert ns["tokenizer"]("no acute findings")["input_ids"][0] == ns["tokenizer"].cls_token_id
  assert sorted(ns["heads"]) == sorted(load_file(str(exported / "projection_heads.safetensors")))


def test_model_card_lists_the_evaluations_of_the_exported_step(run_dir, tmp_path):
  """An evaluation of the exported step under <workdir>/eval/ (the evaluate CLI's layout)
  appears with its CIs; one of another step does not."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text((run_dir / "config.json").read_text())
  for name in ("checkpoints", "tensorboard"):
    (workdir / name).symlink_to(run_dir / name)
  for step, r1 in ((STEPS, 0.125), (STEPS - 1, 0.5)):
    result = {
      "task": "retrieval",
      "step": step,
      "workdir": str(workdir),
      "cfg": {"n_boot": 20},
      "metrics": {"i2t_R@1": r1, "i2t_R@1_ci_lo": 0.05, "i2t_R@1_ci_hi": 0.25, "t2i_R@1": None},
    }
    (workdir / "eval" / f"retrieval-step{step}").mkdir(parents=True)
    (workdir / "eval" / f"retrieval-step{step}" / "metrics.json").write_text(json.dumps(result))
  export.export(workdir, tmp_path / "out")
  _, body = read_card(tmp_path / "out")
  assert f"(`eval/retrieval-step{STEPS}/metrics.json`;" in body
  assert "| i2t_R@1 | 0.125 [0.05, 0.25] |" in body and "| t2i_R@1 | n/a |" in body
  assert f"retrieval-step{STEPS - 1}" not in body and "| i2t_R@1 | 0.5" not in body
  assert "| val_loss |" in body  # and what training logged at that step


# ----------------------------------------------------------------------------- full-size ResNet
def test_resnet50_export_loads_into_torchvision_resnet50(tmp_path):
  """A full-size image tower exports to what `torchvision.models.resnet50()` takes strictly."""
  from configs import convirt  # pylint: disable=g-import-not-at-top

  config = convirt.get_config("smoke")
  config.model.image.variant = "resnet50"
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  model = families.get(config.model.name).build(config.model)
  abstract = run_dir_lib.abstract_variables(model, config)
  rng = np.random.default_rng(0)
  fill = lambda x: rng.normal(0.0, 0.05, x.shape).astype(np.float32)  # noqa: E731
  variables = jax.tree.map(fill, abstract)
  variables["batch_stats"] = jax.tree.map(
    lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), abstract["batch_stats"]
  )
  # The on-disk layout of train.TrainState (a dict of its fields).
  state = {
    "step": np.int32(7),
    "params": variables["params"],
    "batch_stats": variables["batch_stats"],
    "opt_state": {"count": np.int32(7)},
  }
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, 7, state, {"batches_consumed": 7, "seed": 0})
  mngr.wait_until_finished()
  mngr.close()

  meta = export.export(workdir, tmp_path / "out")
  assert meta["step"] == 7
  assert meta["image_preprocessing"]["architecture"] == "torchvision.models.resnet50"
  cnn = torchvision.models.resnet50()
  cnn.fc = torch.nn.Identity()
  cnn.load_state_dict(
    load_file(str(tmp_path / "out" / "image_encoder" / "model.safetensors")), strict=True
  )
  got = {k: v.numpy() for k, v in cnn.state_dict().items()}
  image = variables["params"]["image"]
  np.testing.assert_array_equal(got["conv1.weight"], image["conv1"]["kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(
    got["layer4.2.bn3.running_var"], variables["batch_stats"]["image"]["layer4"]["2"]["bn3"]["var"]
  )
  np.testing.assert_array_equal(
    got["layer3.0.downsample.1.weight"], image["layer3"]["0"]["downsample"]["1"]["scale"]
  )
  # And the forward pass: torchvision's ResNet-50 on the same pixels as `encode_image`.
  pixels = rng.integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
  ref = model.apply(variables, pixels, train=False, method=model.encode_image)
  pre = meta["image_preprocessing"]
  x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255
  x = (x - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
  with torch.no_grad():
    features = cnn.eval()(x).numpy()
  scale = float(np.abs(ref).max())
  np.testing.assert_allclose(features, ref, rtol=0, atol=ATOL * scale)
  print(f"resnet50 features: max |diff| {np.abs(features - ref).max():.2e} of scale {scale:.2e}")


# ----------------------------------------------------------------------------- errors
def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: "), proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in line, line
  return line


def test_cli_missing_workdir(tmp_path):
  out = tmp_path / "out"
  proc = run_export(f"--workdir={tmp_path / 'nope'}", f"--out={out}")
  assert_one_line_error(proc, str(tmp_path / "nope"), "not found")
  assert not out.exists() and leftovers(tmp_path) == []


def test_cli_missing_step_lists_available(run_dir, tmp_path):
  out = tmp_path / "out"
  proc = run_export(f"--workdir={run_dir}", f"--out={out}", "--step=5")
  assert_one_line_error(proc, "step 5", f"available: {STEPS}")
  assert not out.exists() and leftovers(tmp_path) == []


def test_cli_exports_the_best_step(run_dir, tmp_path):
  """--step=best: the kept checkpoint of lowest validation loss (ConVIRT's choice of model)."""
  from medvl_jax.ckpt import checkpoint

  best = checkpoint.best_step(run_dir)
  assert best is not None
  proc = run_export(f"--workdir={run_dir}", f"--out={tmp_path / 'out'}", "--step=best")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"exported step {best} of" in proc.stdout


def test_cli_refuses_existing_out(run_dir, exported):
  before = {p: p.stat().st_mtime_ns for p in exported.rglob("*")}
  proc = run_export(f"--workdir={run_dir}", f"--out={exported}")
  assert_one_line_error(proc, str(exported), "--overwrite")
  assert {p: p.stat().st_mtime_ns for p in exported.rglob("*")} == before
  assert leftovers(exported.parent) == []


def test_no_checkpoints(tmp_path, run_dir):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text((run_dir / "config.json").read_text())
  with pytest.raises(CheckpointError, match="no checkpoints"):
    export.export(workdir, tmp_path / "out")
  assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overwrite_replaces_and_failure_keeps_previous(run_dir, tmp_path, monkeypatch):
  out = tmp_path / "out"
  export.export(run_dir, out)
  (out / "stale.txt").write_text("from an older export")
  with pytest.raises(WeightsError, match="not empty"):
    export.export(run_dir, out)

  # A failure half-way through writing leaves the previous export as it was, and no temp dir.
  def broken(*args, **kwargs):
    raise OSError("disk full")

  from medvl_jax.interop import convirt as convirt_interop  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(convirt_interop, "heads_state_dict", broken)  # written after both towers
  with pytest.raises(WeightsError, match="cannot write the export: disk full"):
    export.export(run_dir, out, overwrite=True)
  assert (out / "stale.txt").exists() and leftovers(tmp_path) == []
  monkeypatch.undo()
  export.export(run_dir, out, overwrite=True)
  assert not (out / "stale.txt").exists() and (out / "export.json").exists()
  assert leftovers(tmp_path) == []
  # --overwrite never deletes a directory that is not an export.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(WeightsError, match="not an export directory"):
    export.export(run_dir, other, overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"
