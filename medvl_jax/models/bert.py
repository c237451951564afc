"""BERT encoder numerically equal to `transformers.BertModel` (absolute positions, post-LN).

Submodule names follow the Hugging Face state-dict names (`embeddings/word_embeddings`,
`encoder/layer/0/attention/self/query`, ...) so `medvl_jax.interop` maps them one-to-one.
The pooler is left out: ConVIRT max-pools the token outputs instead.
"""

from collections.abc import Mapping
import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.errors import ConfigError, WeightsError

_INIT = nn.initializers.normal(stddev=0.02)  # HF `initializer_range` default.

# BertConfig field -> Hugging Face config.json key.
_HF_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "hidden_size",
  "num_layers": "num_hidden_layers",
  "num_heads": "num_attention_heads",
  "intermediate_size": "intermediate_size",
  "max_position_embeddings": "max_position_embeddings",
  "type_vocab_size": "type_vocab_size",
  "layer_norm_eps": "layer_norm_eps",
  "hidden_dropout": "hidden_dropout_prob",
  "attention_dropout": "attention_probs_dropout_prob",
  "pad_token_id": "pad_token_id",
}
_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and regularisation of a BERT encoder (names shortened from HF's config)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ConfigError(
        f"BERT hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], source: str = "config.json") -> "BertConfig":
    """Builds a config from a HF `config.json` dict; `source` names the file in errors."""
    model_type = d.get("model_type")
    architectures = d.get("architectures") or []
    # Configs written before transformers 2.x have no model_type; accept them as BERT
    # unless they name a non-BERT architecture.
    legacy_bert = model_type is None and all(a.startswith("Bert") for a in architectures)
    if model_type != "bert" and not legacy_bert:
      what = model_type if model_type is not None else f"missing, architectures {architectures}"
      raise WeightsError(f"{source}: model_type is {what!r}, only 'bert' is supported")
    if d.get("hidden_act", "gelu") != "gelu":
      raise WeightsError(
        f"{source}: hidden_act is {d['hidden_act']!r}, only exact 'gelu' is supported"
      )
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise WeightsError(
        f"{source}: position_embedding_type is "
        f"{d['position_embedding_type']!r}, only 'absolute' is supported"
      )
    missing = [_HF_KEYS[f] for f in _REQUIRED if _HF_KEYS[f] not in d]
    if missing:
      raise WeightsError(f"{source}: missing keys {', '.join(missing)}")
    kwargs = {f: d[k] for f, k in _HF_KEYS.items() if d.get(k) is not None}
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """Returns a dict that `transformers.BertConfig(**d)` / `config.json` accepts."""
    d = {k: getattr(self, f) for f, k in _HF_KEYS.items()}
    d.update(
      model_type="bert",
      architectures=["BertModel"],
      hidden_act="gelu",
      position_embedding_type="absolute",
      initializer_range=0.02,
    )
    return d


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, train: bool) -> jax.Array:
    cfg = self.config

    def embed(num: int, name: str) -> nn.Embed:
      return nn.Embed(num, cfg.hidden_size, embedding_init=_INIT, dtype=self.dtype, name=name)

    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (
      embed(cfg.vocab_size, "word_embeddings")(input_ids)
      + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
      + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return nn.Dropout(cfg.hidden_dropout, deterministic=not train)(x)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product attention over unpadded keys."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    n, length, _ = x.shape
    head_dim = cfg.hidden_size // cfg.num_heads

    def heads(name: str) -> jax.Array:
      y = nn.Dense(cfg.hidden_size, kernel_init=_INIT, dtype=self.dtype, name=name)(x)
      return y.reshape(n, length, cfg.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    # HF adds finfo.min to padded keys; masking to finfo.min gives the same softmax.
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
    return out.reshape(n, length, cfg.hidden_size)


class BertResidualOutput(nn.Module):
  """Dense -> dropout -> LayerNorm(y + residual) (HF's BertSelfOutput and BertOutput)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, residual: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    y = nn.Dense(cfg.hidden_size, kernel_init=_INIT, dtype=self.dtype, name="dense")(y)
    y = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(y)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
      y + residual
    )


class BertAttention(nn.Module):
  """HF BertAttention: `self` (attention) and `output` (projection + residual LayerNorm)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    y = BertSelfAttention(self.config, self.dtype, name="self")(x, key_mask, train)
    return BertResidualOutput(self.config, self.dtype, name="output")(y, x, train)


class BertIntermediate(nn.Module):
  """Dense to the intermediate size with exact (erf) gelu."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.config.intermediate_size, kernel_init=_INIT, dtype=self.dtype, name="dense")(
      x
    )
    return nn.gelu(x, approximate=False)


class BertLayer(nn.Module):
  """One post-LN transformer block."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    x = BertAttention(self.config, self.dtype, name="attention")(x, key_mask, train)
    y = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
    return BertResidualOutput(self.config, self.dtype, name="output")(y, x, train)


class BertLayerStack(nn.Module):
  """HF `encoder.layer`: blocks named '0', '1', ..."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, self.dtype, name=str(i))(x, key_mask, train)
    return x


class BertEncoder(nn.Module):
  """HF `encoder`: holds the layer stack under `layer`."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    return BertLayerStack(self.config, self.dtype, name="layer")(x, key_mask, train)


class BertModel(nn.Module):
  """BERT without pooler; dropout (rng 'dropout') is active only when `train` is True."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """Returns the last hidden states [N, L, H] for token ids [N, L] and a 0/1 mask [N, L]."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids, train)
    key_mask = jnp.asarray(attention_mask) > 0
    return BertEncoder(self.config, self.dtype, name="encoder")(x, key_mask, train)


def read_config(path: str | os.PathLike) -> BertConfig:
  """Reads `<path>/config.json` of a local Hugging Face BERT directory."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise WeightsError(f"{path}: BERT checkpoint directory not found")
  config_file = path / "config.json"
  if not config_file.is_file():
    raise WeightsError(f"{config_file}: not found (expected a Hugging Face BERT directory)")
  try:
    d = json.loads(config_file.read_text())
  except (OSError, ValueError) as e:
    raise WeightsError(f"{config_file}: cannot parse: {e}") from e
  if not isinstance(d, dict):
    raise WeightsError(f"{config_file}: expected a JSON object")
  return BertConfig.from_hf(d, source=str(config_file))
