"""medvl_jax/cli.py in-process: locating an absent config key. The CLIs themselves:
tests/end_to_end/test_cli.py."""

import pytest

from medvl_jax import cli


@pytest.fixture(scope="module")
def smoke_config():
  from configs import convirt  # pylint: disable=g-import-not-at-top

  return convirt.get_config("smoke")


@pytest.mark.parametrize(
  "path,want",
  [
    ("batch_sizee", ("batch_sizee", "batch_size")),
    ("optimizer.lrr", ("optimizer.lrr", "optimizer.lr")),
    ("optimizr.lr", ("optimizr", "optimizer")),
    ("model.text.initt", ("model.text.initt", "model.text.init")),
    ("zzzqqq", ("zzzqqq", None)),
    ("seed.x", ("seed.x", None)),  # below a number: nothing to suggest
    ("data.sources[0].weight", ("data.sources[0]", None)),  # the smoke config has no sources
    ("optimizer.lr", None),  # exists
  ],
)
def test_absent_key_is_the_full_dotted_key_with_the_closest_one(smoke_config, path, want):
  assert cli._absent_key(smoke_config, path) == want  # pylint: disable=protected-access
