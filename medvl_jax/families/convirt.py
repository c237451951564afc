"""The ConVIRT family: ResNet + BERT towers with projection heads, asymmetric InfoNCE.

Rows count in the loss where they are paired (`has_image & has_text`) and, in eval batches,
not padding (`mask`); a ConVIRT run on the one-source shorthand has only paired rows.
"""

import pathlib

import jax

from medvl_jax import losses
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import ConfigError
from medvl_jax.families import Family, Split, row_mask, text_tower_mask
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


def encode_image(model, variables, images):
  h = model.apply(variables, images, False, method=type(model).encode_image)
  return h, model.apply(variables, h, method=lambda m, x: m.image_proj(x))


def encode_text(model, variables, ids, mask):
  h = model.apply(variables, ids, mask, False, method=type(model).encode_text)
  return model.apply(variables, h, method=lambda m, x: m.text_proj(x))


def _valid(key, value, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(sorted(valid))}")


def check_config(model_cfg) -> None:
  """dtype, image variant, mean/std, checkpoint paths and tokenizer: no data read."""
  _valid("config.model.dtype", model_cfg.dtype, convirt_model.DTYPES)
  _valid("config.model.image.variant", model_cfg.image.variant, convirt_model.IMAGE_VARIANTS)
  _valid("config.model.image.conv_impl", model_cfg.image.conv_impl, convirt_model.CONV_IMPLS)
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
  convirt_model.text_config(text)  # model_type, activation, shape, init_layers: one line
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
  encode_image=encode_image,
  encode_text=encode_text,
  check_config=check_config,
  losses=("infonce",),  # asymmetric InfoNCE (lam, temperature, impl): losses.LOSSES
  make_split=make_split,
)
