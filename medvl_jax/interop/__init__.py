"""Import and export of PyTorch-format checkpoints: the public surface.

mapping             the flax path <-> PyTorch name rule, `to_torch` / `from_torch`, and
                    `read_state_dict` (.safetensors, or a torch pickle with weights_only)
hf_bert             Hugging Face BERT directories <-> `models.bert.BertModel`
torchvision_resnet  torchvision ResNet state dicts <-> `models.resnet.ResNet`
timm_vit            timm VisionTransformer state dicts <-> `models.vit.ViT`
registry            each family's interop half (`FamilyInterop`), by config.model.name
convirt, mixed      those halves: pretrained import and export of one family each
pretrained          `init_from_pretrained`: a model's towers from the checkpoints in the config
export_files        how export files are written (safetensors, JSON, tokenizer, versions)
"""

from medvl_jax.interop.mapping import from_torch, read_state_dict, to_torch, torch_name

__all__ = ["from_torch", "read_state_dict", "to_torch", "torch_name"]
