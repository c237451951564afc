"""The mixed model's loss and gradients on 8 simulated devices equal one device's."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from configs import mixed as mixed_config
    from medvl_jax.data import batch as batch_lib
    from medvl_jax.families import mixed as mixed_family
    from medvl_jax.models import mixed
    assert jax.device_count() == 8
    cfg = mixed_config.get_config("smoke")
    model = mixed.from_config(cfg.model)
    dummy = batch_lib.zeros(2, model.vit_config.image_size, 8)
    params = mixed.init(model, jax.random.key(0), dummy)["params"]
    rng = np.random.default_rng(0)
    kinds = "pitppitp"
    has_image = np.array([k in "pi" for k in kinds])
    has_text = np.array([k in "pt" for k in kinds])
    ids = rng.integers(1000, 30000, (8, 16)).astype(np.int32); att = np.ones((8, 16), np.int32)
    ids[~has_text] = 0; att[~has_text] = 0
    batch = {"image": rng.integers(0, 256, (8, 64, 64, 1)).astype(np.uint8),
             "input_ids": ids, "attention_mask": att, "has_image": has_image,
             "has_text": has_text, "source": np.zeros(8, np.int32)}
    rngs = {"masking": jax.random.key(1), "dropout": jax.random.key(2)}

    @jax.jit
    def step(p, b):
      fn = lambda p: mixed_family.forward_and_loss(model, {"params": p}, b, rngs, cfg.loss, True)
      return jax.value_and_grad(fn, has_aux=True)(p)

    one = jax.devices()[0]
    (l1, m1), g1 = step(jax.device_put(params, one), jax.device_put(batch, one))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    (l8, m8), g8 = step(replicated, sharded)
    assert sharded["image"].sharding.num_devices == 8
    for k in m1:
      np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g8)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    print("OK", float(l1), float(l8))
""")


@pytest.mark.slow
def test_mixed_loss_and_grads_on_8_devices_equal_1():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout
