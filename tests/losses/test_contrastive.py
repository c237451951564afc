"""The dense InfoNCE against an independent NumPy implementation written from the paper's
equations (the mesh layouts of `contrastive.loss`: test_loss_impl.py)."""

import numpy as np
import pytest

from medvl_jax.losses import contrastive


def numpy_infonce(v, u, lam, tau):
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  n = len(v)
  total = 0.0
  for i in range(n):
    s_vu = np.array([v[i] @ u[k] for k in range(n)]) / tau
    s_uv = np.array([u[i] @ v[k] for k in range(n)]) / tau
    l_vu = -(s_vu[i] - np.log(np.sum(np.exp(s_vu))))
    l_uv = -(s_uv[i] - np.log(np.sum(np.exp(s_uv))))
    total += lam * l_vu + (1 - lam) * l_uv
  return total / n


@pytest.mark.parametrize("lam", [0.5, 0.75])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_infonce_matches_numpy(lam, tau):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(16, 24)).astype(np.float64)
  u = rng.normal(size=(16, 24)).astype(np.float64)
  got, _ = contrastive.infonce(v.astype(np.float32), u.astype(np.float32), lam=lam, temperature=tau)
  # float32 inside vs float64 reference: relative 1e-5 is float32 round-off over 16x24 dots.
  np.testing.assert_allclose(float(got), numpy_infonce(v, u, lam, tau), rtol=1e-5)


def test_asymmetry_and_clip_special_case():
  rng = np.random.default_rng(1)
  v = rng.normal(size=(8, 6)).astype(np.float32)
  u = rng.normal(size=(8, 6)).astype(np.float32)
  sym_a, _ = contrastive.infonce(v, u, lam=0.5, temperature=0.1)
  sym_b, _ = contrastive.infonce(u, v, lam=0.5, temperature=0.1)
  np.testing.assert_allclose(float(sym_a), float(sym_b), rtol=1e-6)
  asym_a, m = contrastive.infonce(v, u, lam=0.75, temperature=0.1)
  asym_b, _ = contrastive.infonce(u, v, lam=0.75, temperature=0.1)
  assert abs(float(asym_a) - float(asym_b)) > 1e-3  # lam != 0.5 weights directions differently
  np.testing.assert_allclose(
    float(asym_a), 0.75 * float(m["loss_i2t"]) + 0.25 * float(m["loss_t2i"]), rtol=1e-6
  )


def test_mask_equals_loss_on_valid_subset():
  rng = np.random.default_rng(2)
  v = rng.normal(size=(10, 5)).astype(np.float32)
  u = rng.normal(size=(10, 5)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], bool)
  # Padding rows hold huge values: they must neither be anchors nor candidates.
  v[~mask] = 1e3
  u[~mask] = -1e3
  got, _ = contrastive.infonce(v, u, lam=0.75, temperature=0.1, mask=mask)
  want = numpy_infonce(v[mask].astype(np.float64), u[mask].astype(np.float64), 0.75, 0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_perfect_alignment_has_low_loss_and_full_accuracy():
  e = np.eye(8, dtype=np.float32)
  loss, m = contrastive.infonce(e, e, lam=0.75, temperature=0.1)
  assert float(m["acc_i2t"]) == 1.0 and float(m["acc_t2i"]) == 1.0
  # Only the 7 off-diagonal exp(0) terms remain: log(1 + 7 e^-10). float32 log-softmax of
  # logits near 10 cancels to ~1e-6 absolute.
  np.testing.assert_allclose(float(loss), np.log1p(7 * np.exp(-10.0)), atol=2e-6)
