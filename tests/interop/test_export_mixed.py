"""Export of a mixed run: a real smoke run, the real CLIs, timm and transformers on the other side.

The JAX reference is the mixed family's encoders (`encode_image` / `encode_text` of
`families.get('mixed')`, what the evaluators use) on the checkpoint as Orbax restores it; the
PyTorch side is a stock timm `VisionTransformer` built from `timm.json`,
`transformers.AutoModel` and the exported heads, pooled as export.json says.
"""

import csv
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest

from medvl_jax import families
from medvl_jax.ckpt import checkpoint
from medvl_jax.interop import export
from medvl_jax.losses import contrastive
from tests.conftest import REPO
from tests.interop.test_export import assert_one_line_error, leftovers, run_export
from tests.interop.test_model_card import card_snippet, check_card

torch = pytest.importorskip("torch", reason="export is checked against PyTorch (extra 'torch')")
# The mixed smoke run (~2 min of compiles on 2 cores) and a real export: the slow suite.
pytestmark = pytest.mark.slow
timm = pytest.importorskip("timm", reason="the ViT tower is checked against timm (extra 'torch')")
transformers = pytest.importorskip(
  "transformers", reason="the text tower is checked against transformers"
)
from PIL import Image  # noqa: E402  # pylint: disable=g-import-not-at-top,g-bad-import-order
from safetensors.torch import load_file  # noqa: E402  # pylint: disable=g-import-not-at-top
import torchvision.transforms as T  # noqa: E402  # pylint: disable=g-import-not-at-top

ATOL = 1e-4  # Absolute, on fp32 features and projections.
STEPS = 40  # the final checkpoint of mixed_smoke_run
DOCS = REPO / "docs" / "export.md"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mixed_run(mixed_smoke_run) -> pathlib.Path:
  """The session's 40-step `configs/mixed.py:smoke` run on the three-source sample (read only:
  exports and copies go elsewhere)."""
  workdir, _ = mixed_smoke_run
  return workdir


@pytest.fixture(scope="module")
def exported(mixed_run, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("exports") / "mixed"
  proc = run_export(f"--workdir={mixed_run}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step {STEPS}" in proc.stdout
  return out


@pytest.fixture(scope="module")
def jax_encoders(mixed_run):
  """(image_fn, text_fn, config): the family's encoders on the Orbax-restored checkpoint."""
  config = ml_collections.ConfigDict(json.loads((mixed_run / "config.json").read_text()))
  family = families.get(config.model.name)
  model = family.build(config.model)
  mngr = checkpoint.manager(mixed_run, read_only=True)
  state = mngr.restore(mngr.latest_step())["state"]
  mngr.close()
  variables = {"params": state["params"]}
  image = jax.jit(lambda images: family.encode_image(model, variables, images))
  text = jax.jit(lambda ids, mask: family.encode_text(model, variables, ids, mask))
  return image, text, config


@pytest.fixture(scope="module")
def samples(sample_data_dir) -> tuple[list[pathlib.Path], list[str]]:
  """Real images (paired sample and NIH) and real report sentences of differing lengths."""
  root = sample_data_dir / "covid_cxr_notes"
  with open(root / "pairs.csv", newline="") as f:
    rows = sorted(
      (r for r in csv.DictReader(f) if r["clinical_notes"].strip()),
      key=lambda r: len(r["clinical_notes"]),
    )
  # 20 to ~100 characters (below and around the smoke model's 32 tokens), and the longest
  # note (truncated).
  rows = [rows[i] for i in np.linspace(0, len(rows) // 4, 4).astype(int)] + rows[-1:]
  images = [root / r["image_file"] for r in rows]
  images += sorted((sample_data_dir / "nih14_sample").rglob("*.png"))[:2]
  return images, [r["clinical_notes"] for r in rows]


def eval_pixels(path: pathlib.Path, pre: dict) -> np.ndarray:
  """uint8 [S, S] as in docs/export.md: PIL grayscale, resize shorter side, central crop."""
  image = Image.open(path).convert("L")
  return np.asarray(T.CenterCrop(pre["crop_size"])(T.Resize(pre["resize"])(image)))


def load_torch(out: pathlib.Path):
  arch = json.loads((out / "image_encoder" / "timm.json").read_text())
  vit = timm.create_model(arch["architecture"], pretrained=False, **arch["kwargs"])
  vit.load_state_dict(load_file(str(out / "image_encoder" / "model.safetensors")), strict=True)
  bert = transformers.AutoModel.from_pretrained(str(out / "text_encoder"))
  return vit.eval(), bert.eval(), load_file(str(out / "projection_heads.safetensors"))


def project(heads, h, k):
  h = torch.relu(h @ heads[f"{k}.fc1.weight"].T + heads[f"{k}.fc1.bias"])
  return h @ heads[f"{k}.fc2.weight"].T + heads[f"{k}.fc2.bias"]


def pool_text(hidden, mask, how: str):
  """The rules export.json states, written independently of the JAX model."""
  keep = mask[..., None] > 0
  if how == "cls":
    return hidden[:, 0]
  if how == "mean":
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
  assert how == "max", how
  return hidden.masked_fill(~keep, -torch.inf).max(dim=1).values


# ----------------------------------------------------------------------------- layout
def test_layout_and_metadata(exported, mixed_run):
  assert leftovers(exported.parent) == []
  files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
  assert {
    "export.json",
    "projection_heads.safetensors",
    "image_encoder/model.safetensors",
    "image_encoder/timm.json",
    "image_encoder/preprocessing.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/vocab.txt",
  } <= set(files)
  meta = json.loads((exported / "export.json").read_text())
  assert meta["model"] == "mixed" and meta["step"] == STEPS
  assert meta["config"] == json.loads((mixed_run / "config.json").read_text())
  assert {"jax", "flax", "transformers", "torch", "timm"} <= set(meta["versions"])
  arch = json.loads((exported / "image_encoder" / "timm.json").read_text())
  assert arch == {
    "architecture": meta["image_encoder"]["architecture"],
    "kwargs": meta["image_encoder"]["kwargs"],
  }
  assert arch["kwargs"]["img_size"] == 64 and arch["kwargs"]["patch_size"] == 8
  assert arch["kwargs"]["num_classes"] == 0 and arch["kwargs"]["global_pool"] == "token"
  # configs/mixed.py: image.pool = 'cls', text.pool = 'max'.
  assert (meta["pooling"]["image_pool"], meta["pooling"]["text_pool"]) == ("cls", "max")
  pre = json.loads((exported / "image_encoder" / "preprocessing.json").read_text())
  assert pre == meta["image_preprocessing"]
  assert (pre["crop_size"], pre["resize"], pre["in_chans"]) == (64, 72, 3)
  assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
  heads = load_file(str(exported / "projection_heads.safetensors"))
  assert {k: tuple(v.shape) for k, v in heads.items()} == {
    "image.fc1.weight": (32, 32),
    "image.fc1.bias": (32,),
    "image.fc2.weight": (32, 32),
    "image.fc2.bias": (32,),
    "text.fc1.weight": (32, 32),
    "text.fc1.bias": (32,),
    "text.fc2.weight": (32, 32),
    "text.fc2.bias": (32,),
  }
  # Only the towers and heads: nothing of the fusion layers, MLM head or pixel decoder.
  names = set(load_file(str(exported / "image_encoder" / "model.safetensors")))
  assert not any(n.startswith(("fusion", "decoder", "mlm", "head.")) for n in names)


def test_torch_models_load_strictly(exported):
  vit, _, _ = load_torch(exported)  # strict=True inside
  assert isinstance(vit, timm.models.vision_transformer.VisionTransformer)
  bert, info = transformers.AutoModel.from_pretrained(
    str(exported / "text_encoder"), output_loading_info=True
  )
  assert isinstance(bert, transformers.BertModel)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported / "text_encoder"))
  assert tokenizer("no acute findings")["input_ids"][0] == tokenizer.cls_token_id


# ----------------------------------------------------------------------------- equality
def test_torch_embeddings_equal_jax(exported, jax_encoders, samples):
  image_fn, text_fn, config = jax_encoders
  images, sentences = samples
  meta = json.loads((exported / "export.json").read_text())
  pre = meta["image_preprocessing"]
  pixels = np.stack([eval_pixels(p, pre) for p in images])  # [N, S, S] uint8
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported / "text_encoder"))
  tokens = tokenizer(
    sentences,
    padding=True,
    truncation=True,
    max_length=meta["text_preprocessing"]["max_length"],
    return_tensors="np",
  )
  ids, mask = tokens["input_ids"], tokens["attention_mask"]
  assert len(set(mask.sum(axis=1))) > 2 and (mask == 0).any()  # real padding, varied lengths
  assert mask.shape[1] == config.data.max_length  # the longest note is truncated

  h_ref, z_image_ref = image_fn(pixels[..., None])
  z_text_ref = text_fn(ids.astype(np.int32), mask.astype(np.int32))

  vit, bert, heads = load_torch(exported)
  x = torch.from_numpy(pixels).float()[:, None] / 255
  x = x.expand(-1, pre["in_chans"], -1, -1)
  x = (x - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
  with torch.no_grad():
    h_image = vit(x)
    z_image = project(heads, h_image, "image").numpy()
    hidden = bert(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    ).last_hidden_state
    z_text = project(
      heads, pool_text(hidden, torch.from_numpy(mask), meta["pooling"]["text_pool"]), "text"
    ).numpy()

  np.testing.assert_allclose(h_image.numpy(), np.asarray(h_ref), rtol=0, atol=ATOL)
  np.testing.assert_allclose(z_image, np.asarray(z_image_ref), rtol=0, atol=ATOL)
  np.testing.assert_allclose(z_text, np.asarray(z_text_ref), rtol=0, atol=ATOL)
  # Not trivially equal: the embeddings differ between inputs.
  assert np.abs(z_image - z_image[:1]).max() > 1e-3 and np.abs(z_text - z_text[:1]).max() > 1e-3
  print(
    f"max |diff| image {np.abs(z_image - z_image_ref).max():.2e}, "
    f"text {np.abs(z_text - z_text_ref).max():.2e}"
  )


def docs_snippet() -> str:
  text = DOCS.read_text()
  section = text[text.index("## Use an exported mixed model in PyTorch") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_snippet_runs_and_matches_jax(exported, jax_encoders, samples, capsys):
  image_fn, text_fn, _ = jax_encoders
  images, sentences = samples
  code = docs_snippet()
  code, n_out = re.subn(r'^out = ".*?"', f"out = {str(exported)!r}", code, flags=re.M)
  code, n_in = re.subn(
    r"^image_file, sentence = .*$",
    f"image_file, sentence = {str(images[-1])!r}, {sentences[-1]!r}",
    code,
    flags=re.M,
  )
  assert (n_out, n_in) == (1, 1), "docs/export.md: the snippet's path lines changed"
  ns = {}
  exec(compile(code, str(DOCS), "exec"), ns)  # pylint: disable=exec-used
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])

  tokens = ns["tokens"]
  _, z_image_ref = image_fn(np.asarray(ns["pixels"])[None, ..., None])
  z_text_ref = text_fn(
    tokens["input_ids"].numpy().astype(np.int32), tokens["attention_mask"].numpy().astype(np.int32)
  )
  np.testing.assert_allclose(ns["z_image"].numpy(), z_image_ref, rtol=0, atol=ATOL)
  np.testing.assert_allclose(ns["z_text"].numpy(), z_text_ref, rtol=0, atol=ATOL)
  cosine = float(
    np.sum(contrastive.l2_normalize(z_image_ref) * contrastive.l2_normalize(z_text_ref))
  )
  assert printed == pytest.approx(cosine, abs=ATOL)


# ----------------------------------------------------------------------------- model card
def test_model_card(exported, mixed_run, sample_data_dir):
  front, body = check_card(exported, mixed_run, sample_data_dir)
  assert {"masked-image-modeling", "vit", "bert"} <= set(front["tags"])
  assert "ViT (timm `VisionTransformer`, `image_encoder/timm.json`): 64x64 input" in body
  assert "parameters that serve pretraining only" in body  # fusion, MLM head, decoder


def test_model_card_snippet_loads_the_export(exported):
  ns = {}
  exec(compile(card_snippet(exported), "README.md", "exec"), ns)  # pylint: disable=exec-used
  weights = load_file(str(exported / "image_encoder" / "model.safetensors"))
  np.testing.assert_array_equal(ns["vit"].pos_embed.detach(), weights["pos_embed"])
  assert isinstance(ns["vit"], timm.models.vision_transformer.VisionTransformer)
  assert isinstance(ns["bert"], transformers.BertModel)
  assert sorted(ns["heads"]) == sorted(load_file(str(exported / "projection_heads.safetensors")))


# ----------------------------------------------------------------------------- other pools
def test_mean_pools_export_to_what_timm_and_the_rules_compute(mixed_run, tmp_path, samples):
  """A run with image.pool = text.pool = 'mean' (the smoke checkpoint's weights, re-labelled:
  pooling adds no parameters) exports a timm model that mean-pools patch tokens itself."""
  config = ml_collections.ConfigDict(json.loads((mixed_run / "config.json").read_text()))
  config.model.image.pool = "mean"
  config.model.text.pool = "mean"
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  (workdir / "checkpoints").symlink_to(mixed_run / "checkpoints")
  out = tmp_path / "out"
  meta = export.export(workdir, out)
  assert meta["image_encoder"]["kwargs"]["global_pool"] == "avg"
  assert (meta["pooling"]["image_pool"], meta["pooling"]["text_pool"]) == ("mean", "mean")

  family = families.get("mixed")
  model = family.build(config.model)
  mngr = checkpoint.manager(mixed_run, read_only=True)
  variables = {"params": mngr.restore(mngr.latest_step())["state"]["params"]}
  mngr.close()
  images, sentences = samples
  pre = meta["image_preprocessing"]
  pixels = np.stack([eval_pixels(p, pre) for p in images[:3]])
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "text_encoder"))
  tokens = tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="np")
  _, z_image_ref = family.encode_image(model, variables, pixels[..., None])
  z_text_ref = family.encode_text(
    model,
    variables,
    tokens["input_ids"].astype(np.int32),
    tokens["attention_mask"].astype(np.int32),
  )

  vit, bert, heads = load_torch(out)
  x = torch.from_numpy(pixels).float()[:, None].expand(-1, 3, -1, -1) / 255
  x = (x - 0.5) / 0.5
  mask = torch.from_numpy(tokens["attention_mask"])
  with torch.no_grad():
    z_image = project(heads, vit(x), "image").numpy()
    hidden = bert(
      input_ids=torch.from_numpy(tokens["input_ids"]), attention_mask=mask
    ).last_hidden_state
    z_text = project(heads, pool_text(hidden, mask, "mean"), "text").numpy()
  np.testing.assert_allclose(z_image, np.asarray(z_image_ref), rtol=0, atol=ATOL)
  np.testing.assert_allclose(z_text, np.asarray(z_text_ref), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- errors
def test_missing_tokenizer_is_one_line_and_leaves_nothing(mixed_run, tmp_path):
  config = json.loads((mixed_run / "config.json").read_text())
  config["model"]["text"]["tokenizer"] = str(tmp_path / "gone")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "checkpoints").symlink_to(mixed_run / "checkpoints")
  out = tmp_path / "out"
  proc = run_export(f"--workdir={workdir}", f"--out={out}")
  assert_one_line_error(proc, "tokenizer directory", str(tmp_path / "gone"))
  assert not out.exists() and leftovers(tmp_path) == []
