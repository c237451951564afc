"""The ConVIRT family: ResNet + BERT towers with projection heads, asymmetric InfoNCE.

Rows count in the loss where they are paired (`has_image & has_text`) and, in eval batches,
not padding (`mask`); a ConVIRT run on the one-source shorthand has only paired rows.
"""

import pathlib
from typing import Any

import jax
import numpy as np

from medvl_jax import interop, losses
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import ConfigError
from medvl_jax.families import Encoders, Family, Split, row_mask, text_tower_mask
from medvl_jax.interop import export_files, hf_bert, pretrained, torchvision_resnet
from medvl_jax.models import bert as bert_model
from medvl_jax.models import convirt as convirt_model


def init(model, batch: dict, rng: jax.Array) -> dict:
  return model.init(
    {"params": rng, "dropout": rng},
    batch["image"],
    batch["input_ids"],
    batch["attention_mask"],
    train=False,
  )


def _apply_train(model, variables, batch: dict, rng):
  """The towers in train mode: (outputs, updated variables with the new batch statistics)."""
  return model.apply(
    variables,
    batch["image"],
    batch["input_ids"],
    batch["attention_mask"],
    train=True,
    rngs={"dropout": rng},
    mutable=["batch_stats"],
  )


def make_loss(config, mesh=None):
  loss_impl = losses.LOSSES[config.loss.name]
  loss_cfg = config.loss

  def loss_fn(model, variables, batch: dict, rng, train: bool):
    if train:
      out, new_vars = _apply_train(model, variables, batch, rng)
      new_stats = new_vars["batch_stats"]
    else:
      out = model.apply(
        variables, batch["image"], batch["input_ids"], batch["attention_mask"], train=False
      )
      new_stats = variables.get("batch_stats", {})
    loss, metrics = loss_impl(out, loss_cfg, row_mask(batch), mesh)
    return loss, metrics, new_stats

  return loss_fn


def make_split(config, mesh=None) -> Split:
  """The InfoNCE loss in parts: each micro-batch's embeddings (the ResNet's BatchNorm
  normalises with that micro-batch's statistics), nothing to sum, the loss of all rows."""
  loss_impl = losses.LOSSES[config.loss.name]

  def micro(model, variables, batch, prepared, rng):
    del prepared
    out, new_vars = _apply_train(model, variables, batch, rng)
    return (out["image_embed"], out["text_embed"]), {}, new_vars["batch_stats"]

  def combine(model, image_embed, text_embed, sums, batch):
    del model, sums
    outputs = {"image_embed": image_embed, "text_embed": text_embed}
    return loss_impl(outputs, config.loss, row_mask(batch), mesh)

  return Split(prepare=lambda model, variables, batch, rng: {}, micro=micro, combine=combine)


def encoders(model) -> Encoders:
  def image(variables, images):
    h = model.apply(variables, images, False, method=type(model).encode_image)
    return h, model.apply(variables, h, method=lambda m, x: m.image_proj(x))

  def text(variables, ids, mask):
    h = model.apply(variables, ids, mask, False, method=type(model).encode_text)
    return model.apply(variables, h, method=lambda m, x: m.text_proj(x))

  return Encoders(image=image, text=text)


# ----------------------------------------------------------------------------- export
POOLING = (
  "max over non-padding tokens: h_u[j] = max over tokens t with attention_mask[t] == 1 "
  "of last_hidden_state[t, j]; a row without any token gives zeros"
)
EMBEDDING = {
  "image": "z_v = fc2(relu(fc1(h_v))), h_v = image_encoder(preprocess(pixels)) (pooled)",
  "text": "z_u = fc2(relu(fc1(h_u))), h_u = pooling(text_encoder(input_ids, attention_mask))",
  "similarity": "cosine: <z_v / |z_v|, z_u / |z_u|>; the training loss divides it by "
  "loss.temperature",
  "heads": "projection_heads.safetensors: fc(x) = x @ weight.T + bias (torch.nn.Linear)",
}
VERSIONS = (
  "medvl_jax",
  "jax",
  "jaxlib",
  "flax",
  "orbax-checkpoint",
  "transformers",
  "safetensors",
  "numpy",
  "torch",
  "torchvision",
)


def heads_state_dict(params: Any) -> dict[str, np.ndarray]:
  """{'image.fc1.weight': [out, in], 'image.fc1.bias': [out], ..., 'text.fc2.bias'}."""
  return interop.to_torch({"image": params["image_proj"], "text": params["text_proj"]})


def image_preprocessing(config, model) -> dict[str, Any]:
  """What a PyTorch user does to pixels to feed the exported ResNet as `encode_image` does."""
  enc = model.image_encoder
  stages, width = tuple(enc.stage_sizes), int(enc.width)
  resnet50 = stages == (3, 4, 6, 3) and width == 64
  return {
    "architecture": "torchvision.models.resnet50"
    if resnet50
    else f"ResNet v1.5 bottleneck, stage_sizes={list(stages)}, width={width}",
    "fc": "not exported: set model.fc = torch.nn.Identity() before load_state_dict",
    "feature_dim": 4 * width * 2 ** (len(stages) - 1),
    "input": "8-bit grayscale image (PIL mode 'L'), values 0..255",
    "resize": int(config.data.resize),
    "crop_size": int(config.data.image_size),
    "resize_crop": "eval transform: shorter side to `resize` (bilinear, antialiased), then "
    "the central crop_size x crop_size window",
    "scale": "x / 255 in float32",
    "grayscale_to_rgb": "repeat the one channel 3 times",
    "mean": [float(m) for m in model.image_mean],
    "std": [float(s) for s in model.image_std],
    "normalise": "(x - mean) / std per channel",
    "layout": "torch NCHW [N, 3, crop_size, crop_size] (JAX: NHWC)",
  }


def export(model, params, batch_stats, config, out_dir: pathlib.Path) -> dict[str, Any]:
  """torchvision ResNet (no fc), HF BERT directory and heads into `out_dir` (see README)."""
  preprocessing = image_preprocessing(config, model)
  (out_dir / "image_encoder").mkdir()
  export_files.save_safetensors(
    torchvision_resnet.to_torchvision_loadable_state_dict(params["image"], batch_stats["image"]),
    out_dir / "image_encoder" / "model.safetensors",
  )
  export_files.write_json(out_dir / "image_encoder" / "preprocessing.json", preprocessing)
  text_dir = out_dir / "text_encoder"
  text_dir.mkdir()
  export_files.copy_tokenizer(config.model.text, text_dir)
  export_files.write_json(text_dir / "config.json", model.text_encoder.config.to_hf())
  export_files.save_safetensors(
    hf_bert.to_hf_state_dict_with_pooler(params["text"]), text_dir / "model.safetensors"
  )
  export_files.save_safetensors(heads_state_dict(params), out_dir / "projection_heads.safetensors")
  return {
    "files": {
      "image_encoder": "image_encoder/model.safetensors",
      "text_encoder": "text_encoder/",
      "heads": "projection_heads.safetensors",
    },
    "image_preprocessing": preprocessing,
    "text_preprocessing": {
      "tokenizer": "text_encoder/ (AutoTokenizer)",
      "max_length": int(config.data.max_length),
      "truncation": True,
      "token_type_ids": "zeros",
      "padding": "any: padding tokens are masked out of attention and pooling",
    },
    "pooling": POOLING,
    "text_pooler": "pooler.* written as zeros so that AutoModel loads without warnings; "
    "ConVIRT does not use it (pooler_output is meaningless)",
    "embedding": EMBEDDING,
    "temperature": float(config.loss.temperature),
    "versions": export_files.versions(VERSIONS),
  }


def _valid(key, value, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(sorted(valid))}")


def check_config(model_cfg) -> None:
  """dtype, image variant, mean/std, checkpoint paths and tokenizer: no data read."""
  _valid("config.model.dtype", model_cfg.dtype, convirt_model.DTYPES)
  _valid("config.model.image.variant", model_cfg.image.variant, convirt_model.IMAGE_VARIANTS)
  _valid(
    "config.model.image.conv_impl",
    model_cfg.image.get("conv_impl", "auto"),
    convirt_model.CONV_IMPLS,
  )
  for key in ("mean", "std"):
    if len(model_cfg.image[key]) != 3:
      raise ConfigError(
        f"config.model.image.{key}={tuple(model_cfg.image[key])}: expected 3 "
        "values (one per RGB channel)"
      )
  if model_cfg.image.init and not pathlib.Path(model_cfg.image.init).is_file():
    raise ConfigError(
      f"config.model.image.init={model_cfg.image.init!r}: file not found "
      "(a torchvision resnet50 state dict, .safetensors or .pth; '' = random)"
    )
  text = model_cfg.text
  if text.init:
    if not pathlib.Path(text.init).is_dir():
      raise ConfigError(
        f"config.model.text.init={text.init!r}: directory not found (a local "
        "Hugging Face BERT directory; '' = random)"
      )
    bert_model.read_config(text.init)  # model_type, activation, shape: WeightsError naming the file
  tokenizer = tokenizer_lib.directory(text)
  if not tokenizer:
    raise ConfigError(
      "config.model.text.tokenizer is required when config.model.text.init "
      "is '' (a directory with tokenizer.json or vocab.txt)"
    )
  if not pathlib.Path(tokenizer).is_dir():
    raise ConfigError(f"config.model.text.tokenizer={tokenizer!r}: directory not found")


FAMILY = Family(
  name="convirt",
  build=convirt_model.from_config,
  init=init,
  make_loss=make_loss,
  metrics=("loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"),
  summary_metrics=("acc_i2t",),
  trainable_mask=text_tower_mask,
  init_from_pretrained=pretrained.init_from_pretrained,
  has_pretrained=lambda model_cfg: bool(model_cfg.text.init or model_cfg.image.init),
  encoders=encoders,
  export=export,
  check_config=check_config,
  losses=tuple(losses.LOSSES),  # InfoNCE (lam, temperature, impl)
  make_split=make_split,
)
