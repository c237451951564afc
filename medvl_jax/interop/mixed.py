"""The mixed model's towers in and out: a Hugging Face BERT directory and a timm ViT state dict
imported into the towers; the trained towers exported as a timm `VisionTransformer`
(`image_encoder/timm.json` names it), a Hugging Face BERT directory and the projection heads.
The fusion layers, the MLM head and the pixel decoder serve pretraining only: not exported."""

from collections.abc import Mapping
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from medvl_jax.errors import WeightsError
from medvl_jax.interop import export_files, hf_bert, mapping, model_card, timm_vit
from medvl_jax.interop.registry import FamilyInterop
from medvl_jax.models import mixed as mixed_model


# ----------------------------------------------------------------------------- import
def init_from_pretrained(variables: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """Returns `variables` with the towers imported: `text.init` (local HF BERT directory, the
  same import as ConVIRT) into params['text'], `image.init` (timm ViT state dict file) into
  params['image']; '' keeps the initialisation. WeightsError on any mismatch."""
  params = dict(variables["params"])
  imported = {}
  if model_cfg.text.init:
    _, text = hf_bert.load_bert(model_cfg.text.init, model_cfg.text.init_layers)
    imported["text"] = (text, str(model_cfg.text.init))
  if model_cfg.image.init:
    vit = timm_vit.load_vit(model_cfg.image.init, mixed_model.vit_config(model_cfg.image))
    imported["image"] = (vit, str(model_cfg.image.init))
  for key, (new, source) in imported.items():
    old = params[key]
    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
      raise WeightsError(f"{source}: imported params/{key} do not match the model's tree")
    flat_old = jax.tree_util.tree_flatten_with_path(old)[0]
    bad = [
      "/".join(str(k.key) for k in path)
      for (path, a), b in zip(flat_old, jax.tree_util.tree_leaves(new))
      if tuple(a.shape) != tuple(b.shape)
    ]
    if bad:
      raise WeightsError(f"{source}: shape mismatch in params/{key}: {', '.join(bad[:5])}")
    params[key] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype), old, new)
  return {**variables, "params": params}


# ----------------------------------------------------------------------------- export
def timm_architecture(model: mixed_model.MixedModel) -> tuple[str, dict[str, Any]]:
  """(name, kwargs) for `timm.create_model(name, pretrained=False, **kwargs)`: the ViT whose
  output is the pooled feature h_v of `encode_image` (same state dict for either pool)."""
  name, kwargs = timm_vit.timm_architecture(model.vit_config)
  if model.image_pool == "mean":
    # Mean over patch tokens after the final norm; fc_norm=False keeps timm's `norm` in place.
    kwargs = dict(kwargs, global_pool="avg", fc_norm=False)
  return name, kwargs


def export_state_dicts(model: mixed_model.MixedModel, params: Mapping[str, Any]) -> dict[str, Any]:
  """PyTorch-side artefacts of a trained model (the export writes them to files).

  Returns:
    {'image_encoder': timm state dict (strict-loads into `timm.create_model(*timm)`),
     'timm': {'architecture': name, 'kwargs': {...}} for `image_encoder/timm.json`,
     'text_encoder': HF BertModel state dict (zero pooler), 'text_config': HF config dict,
     'heads': projection heads as '{image,text}.fc{1,2}.{weight,bias}'}.
  """
  name, kwargs = timm_architecture(model)
  return {
    "image_encoder": timm_vit.to_timm_state_dict(params["image"]),
    "timm": {"architecture": name, "kwargs": kwargs},
    "text_encoder": hf_bert.to_hf_state_dict_with_pooler(params["text"]),
    "text_config": model.text_encoder.config.to_hf(),
    "heads": mapping.to_torch({"image": params["image_proj"], "text": params["text_proj"]}),
  }


IMAGE_POOLING = {
  "cls": "class token of the final LayerNorm's output: what the timm model returns with "
  "global_pool='token', num_classes=0 (timm.json)",
  "mean": "mean over the patch tokens (class token excluded) of the final LayerNorm's "
  "output: what the timm model returns with global_pool='avg', fc_norm=False, "
  "num_classes=0 (timm.json)",
}
TEXT_POOLING = {
  "max": "max over non-padding tokens: h_u[j] = max over tokens t with attention_mask[t] == 1 "
  "of last_hidden_state[t, j]; a row without any token gives zeros",
  "mean": "mean over non-padding tokens: h_u = sum of last_hidden_state[t] over tokens t with "
  "attention_mask[t] == 1, divided by their count; a row without any token gives "
  "zeros",
  "cls": "h_u = last_hidden_state[:, 0] (the [CLS] token's hidden state, not pooler_output)",
}
EMBEDDING = {
  "image": "z_v = fc2(relu(fc1(h_v))), h_v = image_encoder(preprocess(pixels)) (the timm "
  "model of timm.json; its output is already pooled, see pooling.image)",
  "text": "z_u = fc2(relu(fc1(h_u))), h_u = pooling.text(text_encoder(input_ids, "
  "attention_mask).last_hidden_state)",
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
  "timm",
)


def image_preprocessing(config: Any, model: mixed_model.MixedModel) -> dict[str, Any]:
  """What a PyTorch user does to pixels to feed the exported ViT as `encode_image` does."""
  in_chans = model.vit_config.in_chans
  return {
    "input": "8-bit grayscale image (PIL mode 'L'), values 0..255",
    "resize": int(config.data.resize),
    "crop_size": int(config.data.image_size),
    "resize_crop": "eval transform: shorter side to `resize` (bilinear, antialiased), then "
    "the central crop_size x crop_size window",
    "scale": "x / 255 in float32",
    "in_chans": in_chans,
    "grayscale_to_rgb": "repeat the one channel 3 times"
    if in_chans == 3
    else "no: in_chans=1, the one grey channel",
    "mean": [float(m) for m in model.image_mean],
    "std": [float(s) for s in model.image_std],
    "normalise": "(x - mean) / std per channel",
    "layout": f"torch NCHW [N, {in_chans}, crop_size, crop_size] (JAX: NHWC)",
  }


def export(model, params, batch_stats, config, out_dir: pathlib.Path) -> dict[str, Any]:
  """timm ViT + timm.json, HF BERT directory and heads into `out_dir` (see docs/export.md).

  The fusion layers, the MLM head and the pixel decoder serve pretraining only and are not
  exported; the embeddings use the unimodal towers and heads, as `encoders` does.
  """
  del batch_stats  # The ViT and BERT have none.
  sds = export_state_dicts(model, params)
  preprocessing = image_preprocessing(config, model)
  image_dir = out_dir / "image_encoder"
  image_dir.mkdir()
  export_files.save_safetensors(sds["image_encoder"], image_dir / "model.safetensors")
  export_files.write_json(image_dir / "timm.json", sds["timm"])
  export_files.write_json(image_dir / "preprocessing.json", preprocessing)
  text_dir = out_dir / "text_encoder"
  text_dir.mkdir()
  export_files.copy_tokenizer(config.model.text, text_dir)
  export_files.write_json(text_dir / "config.json", sds["text_config"])
  export_files.save_safetensors(sds["text_encoder"], text_dir / "model.safetensors")
  export_files.save_safetensors(sds["heads"], out_dir / "projection_heads.safetensors")
  return {
    "files": {
      "image_encoder": "image_encoder/model.safetensors",
      "timm": "image_encoder/timm.json",
      "text_encoder": "text_encoder/",
      "heads": "projection_heads.safetensors",
    },
    "image_encoder": {
      "load": "timm.create_model(architecture, pretrained=False, **kwargs) with timm.json, "
      "then load_state_dict(model.safetensors, strict=True); eval()",
      **sds["timm"],
    },
    "image_preprocessing": preprocessing,
    "text_preprocessing": {
      "tokenizer": "text_encoder/ (AutoTokenizer)",
      "max_length": int(config.data.max_length),
      "truncation": True,
      "token_type_ids": "zeros",
      "padding": "any: padding tokens are masked out of attention and pooling",
    },
    "pooling": {
      "image": IMAGE_POOLING[model.image_pool],
      "text": TEXT_POOLING[model.text_pool],
      "image_pool": model.image_pool,
      "text_pool": model.text_pool,
    },
    "text_pooler": "pooler.* written as zeros so that AutoModel loads without warnings; "
    "the mixed model does not use it (pooler_output is meaningless)",
    "embedding": EMBEDDING,
    "temperature": float(config.loss.temperature),
    "not_exported": "fusion layers, MLM head and pixel decoder (pretraining only)",
    "versions": export_files.versions(VERSIONS),
  }


# ----------------------------------------------------------------------------- model card
PYTORCH = """\
import json, timm
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

out = "."  # this folder
arch = json.load(open(f"{out}/image_encoder/timm.json"))
vit = timm.create_model(arch["architecture"], pretrained=False, **arch["kwargs"])
vit.load_state_dict(load_file(f"{out}/image_encoder/model.safetensors"))  # output: pooled h_v
bert = AutoModel.from_pretrained(f"{out}/text_encoder")
tokenizer = AutoTokenizer.from_pretrained(f"{out}/text_encoder")
heads = load_file(f"{out}/projection_heads.safetensors")  # {image,text}.fc{1,2}.{weight,bias}
"""
IMAGE_POOLING_SHORT = {"cls": "the class token", "mean": "the mean of the patch tokens"}


def card(model, config, recorded: dict[str, Any]) -> model_card.FamilyCard:
  del recorded
  v = model.vit_config
  image = (
    f"ViT (timm `VisionTransformer`, `image_encoder/timm.json`): {v.image_size}x{v.image_size} "
    f"input, {v.in_chans} channel(s), patch {v.patch_size}, {v.num_layers} layers, hidden "
    f"{v.hidden_size}, {v.num_heads} heads; h_v = {IMAGE_POOLING_SHORT[model.image_pool]} "
    "after the final LayerNorm"
  )
  text = model_card.bert_tower(
    model.text_encoder.config, int(config.data.max_length), model.text_pool
  )
  return model_card.FamilyCard(
    title="Mixed-data masked image-text encoders (ViT + BERT)",
    tags=(
      "masked-image-modeling",
      "masked-language-modeling",
      "contrastive-learning",
      "vit",
      "bert",
    ),
    towers={"image": image, "text": text},
    pytorch=PYTORCH,
  )


INTEROP = FamilyInterop(
  name="mixed", init_from_pretrained=init_from_pretrained, export=export, card=card
)
