"""bench/xla_profile.py on a real profiled XLA call: ops found, named and grouped by pass."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import xla_profile  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_profile_call_groups_a_conv_and_dot_step_by_pass(tmp_path):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)

  def loss(w, v):
    h = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.square(jax.nn.relu(h) @ v))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(w, v).compile()
  jax.block_until_ready(compiled(w, v))  # warm
  r = xla_profile.profile_call(compiled, (w, v), compiled.as_text(), str(tmp_path / "p"), top=5)

  grads = r["out"]
  np.testing.assert_allclose(grads[1], jax.grad(loss, argnums=1)(w, v), rtol=1e-5)
  assert (tmp_path / "p" / "compiled_hlo.txt").read_text().startswith("HloModule")
  assert r["wall_ms"] > 0 and r["busy_ms"] > 0
  # The forward conv and dot, and the backward (transpose(jvp)) ones, are found and grouped.
  groups = r["groups"]
  assert groups.get("fwd_conv", 0) > 0, groups
  assert any(k.startswith("bwd_") for k in groups), groups
  assert sum(groups.values()) == pytest.approx(r["busy_ms"], rel=1e-3, abs=0.5)
  assert 1 <= len(r["top"]) <= 5
  assert all(t["ms"] > 0 and t["kind"] in ("conv", "dot", "copy", "other") for t in r["top"])
  assert r["top"] == sorted(r["top"], key=lambda t: -t["ms"])
