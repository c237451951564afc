"""Mesh shapes and parameter-sharding rules from config data (medvl_jax/parallel/sharding.py), on
abstract meshes (no devices needed), and the configs' defaults."""

import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import pytest

from configs import convirt, mixed
from medvl_jax.errors import ConfigError
from medvl_jax.parallel import sharding


def mesh(data=2, fsdp=4, model=1):
  return AbstractMesh((data, fsdp, model), ("data", "fsdp", "model"))


@pytest.mark.parametrize(
  "axes, n, sizes",
  [
    ((("data", -1), ("fsdp", 1), ("model", 1)), 8, (8, 1, 1)),
    ((("data", 1), ("fsdp", -1), ("model", 1)), 8, (1, 8, 1)),
    ((("data", 2), ("fsdp", -1)), 8, (2, 4)),
    ((("data", 2), ("fsdp", 2), ("model", 1)), 4, (2, 2, 1)),
    ((("data", -1),), 1, (1,)),
  ],
)
def test_mesh_shape_fills_the_minus_one(axes, n, sizes):
  assert sharding.mesh_shape(axes, n) == (tuple(a for a, _ in axes), sizes)


@pytest.mark.parametrize(
  "axes, n, message",
  [
    ((("data", 3), ("fsdp", -1)), 8, "do not divide the 8 devices"),
    ((("data", 2), ("fsdp", 2)), 8, "multiply to 4, not to the 8 devices"),
    ((("data", -1), ("fsdp", -1)), 8, "at most one -1"),
    ((("data", 1), ("data", -1)), 8, "distinct"),
    (("data",), 8, "expected ((axis name, size), ...)"),
  ],
)
def test_mesh_shape_errors(axes, n, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sharding.mesh_shape(axes, n)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  m = mesh(fsdp=4)
  assert sharding.leaf_spec("k", (384, 1536), "fsdp", m, 0) == (P(None, "fsdp"), [])
  assert sharding.leaf_spec("k", (1536, 6), "fsdp", m, 0) == (P("fsdp", None), [])
  # The largest dimension does not divide: the next one does.
  assert sharding.leaf_spec("k", (30522, 32), "fsdp", m, 0) == (P(None, "fsdp"), [])
  # Small leaves stay replicated; nothing divisible: replicated and reported.
  assert sharding.leaf_spec("b", (32,), "fsdp", m, 2**14) == (P(), [])
  spec, fell = sharding.leaf_spec("odd", (7, 3), "fsdp", m, 0)
  assert spec == P() and fell == ["odd (7, 3) (no dimension divisible by fsdp=4)"]
  # fsdp of size 1: plain replication, no fallback to report.
  assert sharding.leaf_spec("k", (7, 3), "fsdp", mesh(data=8, fsdp=1), 0) == (P(), [])


def test_explicit_spec_falls_back_per_dimension():
  m = mesh(data=2, fsdp=2, model=2)
  spec, fell = sharding.leaf_spec("w", (6, 5), ("fsdp", "model"), m)
  assert spec == P("fsdp", None)
  assert fell == ["w dim 1 (5) by model=2"]
  spec, fell = sharding.leaf_spec("w", (8, 4), (("data", "fsdp"), "model"), m)
  assert spec == P(("data", "fsdp"), "model") and fell == []


def test_rule_errors_are_config_errors():
  m = mesh()
  with pytest.raises(ConfigError, match="axis 'tensor' .* is not a mesh axis"):
    sharding.leaf_spec("w", (8, 8), (None, "tensor"), m)
  with pytest.raises(ConfigError, match="more entries than"):
    sharding.leaf_spec("w", (8,), (None, "fsdp"), m)
  with pytest.raises(ConfigError, match="neither 'fsdp' nor a tuple"):
    sharding.leaf_spec("w", (8,), "model", m)
  with pytest.raises(ConfigError, match="config.sharding.rules="):
    sharding.tree_shardings({}, m, (("(", "fsdp"),))


def test_tree_shardings_first_rule_wins_and_optimizer_state_follows():
  m = mesh(data=2, fsdp=4)
  tree = {
    "params": {"text": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}},
    "opt_state": {"mu": {"text": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}},
    "step": jax.ShapeDtypeStruct((), "int32"),
  }
  rules = (("text/kernel", (None, "fsdp")), (".*", "fsdp"))
  out = sharding.tree_shardings(tree, m, rules, min_size=0)
  assert out["params"]["text"]["kernel"].spec == P(None, "fsdp")
  assert out["opt_state"]["mu"]["text"]["kernel"].spec == P(None, "fsdp")
  assert out["step"].spec == P()


def test_batch_is_split_over_data_and_fsdp():
  m = mesh(data=2, fsdp=4, model=2)
  assert sharding.batch_sharding(m).spec == P(("data", "fsdp"))
  assert sharding.batch_shards(m) == 8
  sharding.check_batch_size(16, m)
  with pytest.raises(ConfigError, match=r"not divisible by the 8 batch shards .*data=2 x fsdp=4"):
    sharding.check_batch_size(12, m)


def test_batch_spec_axes_and_split_axes():
  """The batch's partition spec names every batch axis of the mesh (`BATCH_AXES` order); the
  collectives over the batch rows run over those of size > 1 (mesh order)."""
  m = AbstractMesh((4, 1, 2), ("fsdp", "data", "model"))
  assert sharding.batch_spec_axes(m) == ("data", "fsdp")
  assert sharding.batch_split_axes(m) == ("fsdp",)
  m = AbstractMesh((2, 4), ("fsdp", "data"))
  assert sharding.batch_spec_axes(m) == ("data", "fsdp")
  assert sharding.batch_split_axes(m) == ("fsdp", "data")
  assert sharding.batch_split_axes(mesh(data=2, fsdp=4, model=2)) == ("data", "fsdp")
  assert sharding.batch_split_axes(mesh(data=1, fsdp=1, model=8)) == ()
  assert sharding.batch_spec_axes(AbstractMesh((8,), ("model",))) == ()


def test_defaults_data_parallel_small_fsdp_large():
  for module in (convirt, mixed):
    assert module.get_config().mesh == (("data", -1), ("fsdp", 1), ("model", 1))
    assert module.get_config().sharding.rules == ()
    large = module.get_config("large")
    assert large.mesh == (("data", 1), ("fsdp", -1), ("model", 1))
    assert large.sharding.rules == sharding.FSDP_RULES
