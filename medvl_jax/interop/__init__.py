"""Import and export of PyTorch-format checkpoints: the public surface.

mapping             the flax path <-> PyTorch name rule, `to_torch` / `from_torch`, and
                    `read_state_dict` (.safetensors, or a torch pickle with weights_only)
hf_bert             Hugging Face BERT directories <-> `models.bert.BertModel`
torchvision_resnet  torchvision ResNet state dicts <-> `models.resnet.ResNet`
pretrained          `init_from_pretrained`: a model's towers from the checkpoints in the config
"""

from medvl_jax.interop.mapping import from_torch, read_state_dict, to_torch, torch_name

__all__ = ["from_torch", "read_state_dict", "to_torch", "torch_name"]
