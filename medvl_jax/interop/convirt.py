"""ConVIRT's towers in and out: torchvision ResNet-50 and Hugging Face BERT checkpoints imported
into the model; the trained model exported as a torchvision ResNet (no fc), a Hugging Face BERT
directory and the projection heads."""

from collections.abc import Mapping
import copy
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from medvl_jax.errors import WeightsError
from medvl_jax.interop import export_files, hf_bert, mapping, model_card, torchvision_resnet
from medvl_jax.interop.registry import FamilyInterop


# ----------------------------------------------------------------------------- import
def _replace(
  variables: dict[str, Any], collection: str, key: str, new: Mapping[str, Any], source: str
) -> None:
  """Replaces variables[collection][key] by `new` after checking paths and shapes."""
  old = mapping.flatten(variables[collection][key])
  new_flat = mapping.flatten(new)
  missing = ["/".join(p) for p in old if p not in new_flat]
  extra = ["/".join(p) for p in new_flat if p not in old]
  if missing or extra:
    raise WeightsError(
      f"{source}: imported {collection}/{key} does not match the model: "
      f"missing {mapping.names(missing) or '-'}; unexpected {mapping.names(extra) or '-'}"
    )
  bad = [
    f"{collection}/{key}/{'/'.join(p)} imported {tuple(np.shape(v))} vs model {tuple(old[p].shape)}"
    for p, v in new_flat.items()
    if tuple(np.shape(v)) != tuple(old[p].shape)
  ]
  if bad:
    raise WeightsError(f"{source}: shape mismatch for {len(bad)} leaves: {mapping.names(bad)}")
  variables[collection][key] = mapping.unflatten(
    {p: jnp.asarray(v, dtype=old[p].dtype) for p, v in new_flat.items()}
  )


def init_from_pretrained(variables: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """Returns a copy of ConVIRT `variables` with the towers replaced by imported checkpoints.

  Args:
    variables: {'params': ..., 'batch_stats': ...} as returned by `ConVIRT.init`.
    model_cfg: the model config; `text.init` (HF BERT dir) and `image.init` (torchvision
      ResNet-50 state dict file) select what is imported; '' means keep the initialisation.

  Raises:
    WeightsError: a checkpoint is missing, unreadable or does not fit the model.
  """
  out = {c: copy.copy(dict(v)) for c, v in variables.items()}
  if model_cfg.text.init:
    _, params = hf_bert.load_bert(model_cfg.text.init, model_cfg.text.init_layers)
    _replace(out, "params", "text", params, str(model_cfg.text.init))
  if model_cfg.image.init:
    params, stats = torchvision_resnet.load_resnet50(model_cfg.image.init)
    _replace(out, "params", "image", params, str(model_cfg.image.init))
    _replace(out, "batch_stats", "image", stats, str(model_cfg.image.init))
  return out


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
  return mapping.to_torch({"image": params["image_proj"], "text": params["text_proj"]})


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
  """torchvision ResNet (no fc), HF BERT directory and heads into `out_dir` (see docs/export.md)."""
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


# ----------------------------------------------------------------------------- model card
PYTORCH = """\
import torch, torchvision
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

out = "."  # this folder
cnn = torchvision.models.resnet50()
cnn.fc = torch.nn.Identity()  # no classifier: the output is the pooled feature h_v
cnn.load_state_dict(load_file(f"{out}/image_encoder/model.safetensors"))
bert = AutoModel.from_pretrained(f"{out}/text_encoder")
tokenizer = AutoTokenizer.from_pretrained(f"{out}/text_encoder")
heads = load_file(f"{out}/projection_heads.safetensors")  # {image,text}.fc{1,2}.{weight,bias}
"""


def card(model, config, recorded: dict[str, Any]) -> model_card.FamilyCard:
  pre = recorded["image_preprocessing"]
  architecture, pytorch = f"`{pre['architecture']}`", PYTORCH
  if pre["architecture"] != "torchvision.models.resnet50":
    architecture = pre["architecture"]
    pytorch = (
      f"# The image tower is not torchvision's resnet50 but a\n# {architecture}:\n"
      "# build it from torchvision's ResNet and Bottleneck classes in place of resnet50().\n"
      + pytorch
    )
  image = (
    f"{architecture}, no `fc`: h_v = the {pre['feature_dim']}-d pooled features; input "
    f"{pre['crop_size']}x{pre['crop_size']} grey (resize {pre['resize']}), repeated to 3 channels"
  )
  text = model_card.bert_tower(model.text_encoder.config, int(config.data.max_length), "max")
  return model_card.FamilyCard(
    title="ConVIRT image-text encoders (ResNet + BERT)",
    tags=("convirt", "contrastive-learning", "resnet", "bert"),
    towers={"image": image, "text": text},
    pytorch=pytorch,
  )


INTEROP = FamilyInterop(
  name="convirt", init_from_pretrained=init_from_pretrained, export=export, card=card
)
