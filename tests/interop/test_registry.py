"""Each model family's interop half, chosen by config.model.name; the pretrained import goes
through it."""

import jax
import numpy as np
import pytest

from configs import mixed as mixed_config
from medvl_jax import families
from medvl_jax.errors import ConfigError
from medvl_jax.interop import mixed as mixed_interop
from medvl_jax.interop import pretrained, registry
from medvl_jax.models import mixed


def test_every_family_has_its_interop_half():
  assert registry.names() == families.names()
  for name in families.names():
    assert registry.get(name).name == name


def test_unknown_name_is_one_config_error():
  with pytest.raises(
    ConfigError, match=r"config.model.name='nope' has no weights import/export; valid: convirt"
  ):
    registry.get("nope")


@pytest.mark.slow  # two families' inits: ~20 s
def test_pretrained_import_is_the_named_family_s():
  """`pretrained.init_from_pretrained` imports what the family of config.model.name imports
  (here the real MiniLM BERT into the mixed model's text tower); nothing configured, nothing
  to import."""
  cfg = mixed_config.get_config("smoke")
  assert not pretrained.configured(cfg.model)
  cfg.model.text.init = cfg.model.text.tokenizer
  assert pretrained.configured(cfg.model)
  model = mixed.from_config(cfg.model)
  variables = jax.device_get(families.init_variables(model, cfg, jax.random.key(0)))
  got = pretrained.init_from_pretrained(variables, cfg.model)
  want = mixed_interop.init_from_pretrained(variables, cfg.model)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(got["params"]["text"]), jax.tree.leaves(variables["params"]["text"])
    )
  ]
  assert all(changed)
