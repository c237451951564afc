"""Import and export of PyTorch-format checkpoints: the public surface.

mapping             the flax path <-> PyTorch name rule, `to_torch` / `from_torch`, and
                    `read_state_dict` (.safetensors, or a torch pickle with weights_only)
hf_bert             Hugging Face BERT directories <-> `models.bert.BertModel`
torchvision_resnet  torchvision ResNet state dicts <-> `models.resnet.ResNet`
timm_vit            timm VisionTransformer state dicts <-> `models.vit.ViT`
registry            each family's interop half (`FamilyInterop`), by config.model.name
convirt, mixed      those halves: pretrained import, export and card text of one family each
pretrained          `init_from_pretrained`: a model's towers from the checkpoints in the config
export              a run's checkpoint -> the family's files + export.json + README.md, atomically
                    (`python -m medvl_jax.export` is its command line)
export_files        how export files are written (safetensors, JSON, tokenizer, versions)
model_card          the exported folder's README.md (a Hugging Face model card)
"""

from medvl_jax.interop.mapping import from_torch, read_state_dict, to_torch, torch_name

__all__ = ["from_torch", "read_state_dict", "to_torch", "torch_name"]
