"""The mixed-data family: ViT + BERT with co-attention fusion, trained with MLM, multi-scale
masked vision modeling and a contrastive term on the paired rows (models/mixed.py).

One batch mixes paired, image-only and text-only rows; every loss is masked by `has_image` /
`has_text` (and by `mask` in eval batches), so the family needs nothing else from the trainer.
Random streams: `dropout` (the step key) and `masking` (derived from it).
"""
from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp

from medvl_jax import sharding
from medvl_jax import weights
from medvl_jax.errors import ConfigError, WeightsError
from medvl_jax.families import Encoders, Family
from medvl_jax.models import mixed as mixed_model
from medvl_jax.weights import hf_bert, timm_vit

_MASKING_SALT = 0x6D61736B  # 'mask': the masking stream is independent of dropout's.


def init(model, batch: dict, rng: jax.Array) -> dict:
  return mixed_model.init(model, rng, batch)


def _eval_batch(batch: dict) -> dict:
  """Padding rows of an eval batch (mask False) carry neither modality: no loss sees them."""
  if "mask" not in batch:
    return batch
  keep = batch["mask"].astype(bool)
  return dict(batch, has_image=batch["has_image"] & keep, has_text=batch["has_text"] & keep)


def make_loss(config):
  loss_cfg = config.loss

  def loss_fn(model, variables, batch: dict, rng, train: bool):
    # Eval: a fixed masking key, so validation losses are comparable across evaluations.
    key = rng if rng is not None else jax.random.key(config.seed)
    rngs = {"masking": jax.random.fold_in(key, _MASKING_SALT)}
    if train:
      rngs["dropout"] = key
    loss, metrics = mixed_model.forward_and_loss(model, variables, _eval_batch(batch), rngs,
                                                 loss_cfg, train)
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    return loss, metrics, variables.get("batch_stats", {})

  return loss_fn


def trainable_mask(params, model_cfg):
  """False for the text embeddings (if frozen) and the first K BERT layers; the rest trains."""
  num_layers = len(params["text"]["encoder"]["layer"])
  k = model_cfg.text.frozen_layers
  k = num_layers // 2 if k < 0 else k
  if k > num_layers:
    raise ConfigError(f"config.model.text.frozen_layers={k} exceeds the {num_layers} layers")
  frozen = [rf"^text/encoder/layer/{i}/" for i in range(k)]
  if model_cfg.text.freeze_embeddings:
    frozen.append(r"^text/embeddings/")
  regex = re.compile("|".join(frozen)) if frozen else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (regex and regex.search(sharding.path_str(path))), params)


def encoders(model) -> Encoders:
  cls = type(model)

  def image(variables, images):
    h = model.apply(variables, images, method=cls.encode_image)
    return h, model.apply(variables, images, method=cls.embed_image)

  def text(variables, ids, mask):
    return model.apply(variables, ids, mask, method=cls.embed_text)

  return Encoders(image=image, text=text)


def init_from_pretrained(variables: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """Returns `variables` with the towers imported: `text.init` (local HF BERT directory, the
  same import as ConVIRT) into params['text'], `image.init` (timm ViT state dict file) into
  params['image']; '' keeps the initialisation. WeightsError on any mismatch."""
  params = dict(variables["params"])
  imported = {}
  if model_cfg.text.init:
    imported["text"] = (hf_bert.load_bert(model_cfg.text.init)[1], str(model_cfg.text.init))
  if model_cfg.image.init:
    imported["image"] = (timm_vit.load_vit(model_cfg.image.init, mixed_model.vit_config(model_cfg.image)),
                         str(model_cfg.image.init))
  for key, (new, source) in imported.items():
    old = params[key]
    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
      raise WeightsError(f"{source}: imported params/{key} do not match the model's tree")
    flat_old = jax.tree_util.tree_flatten_with_path(old)[0]
    bad = ["/".join(str(k.key) for k in path) for (path, a), b in
           zip(flat_old, jax.tree_util.tree_leaves(new)) if tuple(a.shape) != tuple(b.shape)]
    if bad:
      raise WeightsError(f"{source}: shape mismatch in params/{key}: {', '.join(bad[:5])}")
    params[key] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype), old, new)
  return {**variables, "params": params}


def export_state_dicts(model: mixed_model.MixedModel, params: Mapping[str, Any]) -> dict[str, Any]:
  """PyTorch-side artefacts of a trained model (the export writes them to files).

  Returns:
    {'image_encoder': timm state dict (strict-loads into `timm.create_model(*timm)`),
     'timm': {'architecture': name, 'kwargs': {...}} for `image_encoder/timm.json`,
     'text_encoder': HF BertModel state dict (zero pooler), 'text_config': HF config dict,
     'heads': projection heads as '{image,text}.fc{1,2}.{weight,bias}'}.
  """
  name, kwargs = timm_vit.timm_architecture(model.vit_config)
  return {
      "image_encoder": timm_vit.to_timm_state_dict(params["image"]),
      "timm": {"architecture": name, "kwargs": kwargs},
      "text_encoder": hf_bert.to_hf_state_dict_with_pooler(params["text"]),
      "text_config": model.text_encoder.config.to_hf(),
      "heads": weights.to_torch({"image": params["image_proj"], "text": params["text_proj"]}),
  }


def check_config(model_cfg) -> None:
  """Nested choices of the mixed model, checked by building it (no I/O, no parameters)."""
  mixed_model.from_config(model_cfg)


FAMILY = Family(
    name="mixed",
    build=mixed_model.from_config,
    init=init,
    make_loss=make_loss,
    metrics=("mlm", "mvm", "contrastive", "mlm_acc", "mlm_tokens", "mvm_patches", "pairs",
             "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"),
    summary_metrics=("mlm", "mvm", "contrastive"),
    trainable_mask=trainable_mask,
    init_from_pretrained=init_from_pretrained,
    has_pretrained=lambda model_cfg: bool(model_cfg.text.init or model_cfg.image.init),
    encoders=encoders,
    check_config=check_config,
    losses=("mixed",),  # MLM + multi-scale MVM + InfoNCE on pairs (losses.mixed_loss)
)
