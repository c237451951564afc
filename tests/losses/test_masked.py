"""MLM and multi-scale MVM losses and the MVM target normalisation against NumPy references."""

import jax.numpy as jnp
import numpy as np

from medvl_jax.losses import masked

SCALES = ("1x1", "2x2", "4x4")


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(3, 7))
  weights = rng.random((3, 7)) < 0.3
  got, m = masked.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  lp = np_log_softmax(logits.astype(np.float64))
  nll = [-lp[i, j, targets[i, j]] for i in range(3) for j in range(7) if weights[i, j]]
  np.testing.assert_allclose(float(got), np.mean(nll), rtol=1e-5)
  assert float(m["mlm_tokens"]) == weights.sum()


def test_mvm_loss_matches_numpy():
  rng = np.random.default_rng(1)
  b, p, d = 6, 16, 12
  pred = rng.normal(size=(b, p, d)).astype(np.float32)
  raw = rng.random((b, p, d)).astype(np.float32)
  mask = rng.random((b, p)) < 0.5
  scale_id = np.array([0, 1, 2, 0, 1, 2])
  has_image = np.array([True, True, True, False, True, True])
  weights = (0.2, 0.3, 0.5)
  target = np.asarray(masked.normalise_patches(jnp.asarray(raw)))
  ref_t = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(target, ref_t, rtol=1e-4, atol=1e-5)
  got, m = masked.mvm_loss(
    jnp.asarray(pred),
    jnp.asarray(target),
    jnp.asarray(mask),
    jnp.asarray(scale_id),
    jnp.asarray(has_image),
    weights,
    SCALES,
  )
  total = 0.0
  for k in range(3):
    errs = [
      np.mean((pred[i, j] - ref_t[i, j]) ** 2)
      for i in range(b)
      for j in range(p)
      if mask[i, j] and has_image[i] and scale_id[i] == k
    ]
    np.testing.assert_allclose(float(m[f"mvm_{SCALES[k]}"]), np.mean(errs), rtol=1e-4)
    total += weights[k] * np.mean(errs)
  np.testing.assert_allclose(float(got), total, rtol=1e-4)
