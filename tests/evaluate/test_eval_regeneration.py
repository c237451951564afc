"""Regeneration evaluation: PSNR/SSIM against scikit-image, the baselines, masks, the real CLI.

The CLI tests train a real mixed smoke model (configs/mixed.py:smoke, ~1 min) once per session
and evaluate its checkpoint on held-out sample images (validation + test).
"""

import json
import pathlib

import numpy as np
from PIL import Image
import pytest
from skimage import metrics as skm

from medvl_jax.evaluate import regeneration as rg
from medvl_jax.losses import masking
from tests.conftest import run_eval

MIXED_STEPS = 40  # The smoke config's own length.


def _images(seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = ndimage_smooth(rng.uniform(0, 255, (size, size)))
  y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
  return x, y


def ndimage_smooth(a: np.ndarray) -> np.ndarray:
  from scipy import ndimage

  return ndimage.uniform_filter(a, 5)


def _block_mask(size: int, rows: slice, cols: slice) -> np.ndarray:
  m = np.zeros((size, size), bool)
  m[rows, cols] = True
  return m


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_matches_skimage_on_masked_pixels(seed):
  x, y = _images(seed)
  mask = np.random.default_rng(seed + 10).uniform(size=x.shape) < 0.3
  want = skm.peak_signal_noise_ratio(x[mask], y[mask], data_range=255)
  assert rg.psnr(x, y, mask) == pytest.approx(want, abs=1e-9)
  # Visible pixels do not count: changing them changes nothing.
  y2 = np.where(mask, y, 0.0)
  assert rg.psnr(x, y2, mask) == pytest.approx(want, abs=1e-9)
  assert rg.psnr(x, x, mask) == float("inf")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage_map_on_masked_pixels(seed):
  x, y = _images(seed, size=40)
  _, full = skm.structural_similarity(
    x, y, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
  )
  np.testing.assert_allclose(rg.ssim_map(x, y), full, atol=1e-10)
  mask = _block_mask(40, slice(8, 24), slice(16, 32))
  assert rg.ssim(x, y, mask) == pytest.approx(full[mask].mean(), abs=1e-10)
  assert rg.ssim(x, x, mask) == pytest.approx(1.0, abs=1e-12)


def test_metrics_reject_an_empty_mask():
  x, y = _images()
  for fn in (rg.psnr, rg.ssim):
    with pytest.raises(ValueError, match="selects no pixel"):
      fn(x, y, np.zeros(x.shape, bool))


# ----------------------------------------------------------------------------- baselines
def test_mean_fill_is_the_visible_mean_and_exact_on_a_constant_image():
  x, _ = _images()
  mask = _block_mask(32, slice(0, 8), slice(0, 16))
  filled = rg.mean_fill(x, mask)
  np.testing.assert_array_equal(filled[~mask], x[~mask])
  np.testing.assert_allclose(filled[mask], x[~mask].mean())
  const = np.full((32, 32), 97.0)
  assert rg.psnr(const, rg.mean_fill(const, mask), mask) == float("inf")
  assert rg.ssim(const, rg.mean_fill(const, mask), mask) == pytest.approx(1.0)
  assert min(rg.psnr(const, rg.mean_fill(const, mask), mask), rg.PSNR_CAP) == rg.PSNR_CAP


def test_blur_fill_beats_mean_fill_on_smooth_images_and_keeps_visible_pixels():
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
  ramp = 40 + 2 * xx + yy  # A smooth image: the local context predicts the hole.
  mask = _block_mask(64, slice(24, 32), slice(40, 48))
  blurred = rg.blur_fill(ramp, mask, sigma=4.0)
  np.testing.assert_array_equal(blurred[~mask], ramp[~mask])
  assert rg.psnr(ramp, blurred, mask) > rg.psnr(ramp, rg.mean_fill(ramp, mask), mask) + 10
  const = np.full((64, 64), 12.0)
  assert rg.psnr(const, rg.blur_fill(const, mask, 4.0), mask) > 200  # Exact up to rounding.


def test_blur_fill_falls_back_to_the_visible_mean_where_the_blur_does_not_reach():
  x = np.zeros((64, 64))
  x[:, :2] = 200.0
  mask = np.ones((64, 64), bool)
  mask[:, :2] = False  # Only two columns visible; sigma 0.5 reaches ~4 px.
  filled = rg.blur_fill(x, mask, sigma=0.5)
  assert filled[0, 40] == pytest.approx(200.0)
  assert np.isfinite(filled).all()


# ----------------------------------------------------------------------------- masks
def test_masks_are_deterministic_per_image_and_scale():
  cfg = masking.ImageMaskConfig(grid=8, scales=(1, 2, 4), ratios=(0.75, 0.6, 0.5))
  for k, s in enumerate(cfg.scales):
    a = rg.draw_masks(cfg, k, 20, seed=3)
    np.testing.assert_array_equal(a, rg.draw_masks(cfg, k, 20, seed=3))
    np.testing.assert_array_equal(a[:5], rg.draw_masks(cfg, k, 5, seed=3))  # Per image.
    assert not np.array_equal(a, rg.draw_masks(cfg, k, 20, seed=4))
    assert len({m.tobytes() for m in a}) > 1  # Images get different masks.
    nb = -(-8 // s)
    want = round(cfg.ratios[k] * nb * nb) * s * s / 64
    np.testing.assert_allclose(a.mean(1), want)  # 8 is divisible by every scale here.
    pix = rg.pixel_mask(a, 8, 8)
    assert pix.shape == (20, 64, 64) and pix.mean() == pytest.approx(a.mean())


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="session")
def mixed_run(mixed_smoke_run) -> pathlib.Path:
  """The shared trained mixed smoke run (conftest), read-only."""
  return mixed_smoke_run[0]


@pytest.mark.slow  # the mixed smoke run: ~2 min of compiles on 2 cores
def test_cli_on_a_trained_mixed_model(mixed_run, tmp_path):
  out = tmp_path / "regen"
  proc = run_eval(
    f"--workdir={mixed_run}", "--task=regeneration", f"--out={out}", "--cfg=n_boot=200"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "metrics.json").read_text())
  m = result["metrics"]
  assert result["step"] == MIXED_STEPS and result["plots"] == ["regeneration_sheet.png"]
  scales = ("1x1", "2x2", "4x4")  # configs/mixed.py:smoke
  names = [
    f"{what}{fill}_{s}"
    for s in scales
    for what in ("psnr", "ssim")
    for fill in ("", "_meanfill", "_blurfill")
  ] + [f"psnr_gain_{s}" for s in scales]
  for n in names:
    for suffix in ("", "_ci_lo", "_ci_hi"):
      v = m[f"regeneration/{n}{suffix}"]
      assert v is not None and np.isfinite(v), (n, suffix, v)
    assert m[f"regeneration/{n}_ci_lo"] <= m[f"regeneration/{n}"] <= m[f"regeneration/{n}_ci_hi"], n
  assert len([k for k in m if not k.endswith(("_ci_lo", "_ci_hi"))]) == len(names) + 1
  assert m["regeneration/n_images"] >= 20  # validation + test of the paired sample
  for s in scales:
    # The acceptance point: the trained model beats the mean-pixel fill on held-out images.
    assert m[f"regeneration/psnr_{s}"] > m[f"regeneration/psnr_meanfill_{s}"], s
    assert m[f"regeneration/psnr_gain_{s}"] == pytest.approx(
      m[f"regeneration/psnr_{s}"] - m[f"regeneration/psnr_meanfill_{s}"], abs=1e-6
    )
    assert -1 <= m[f"regeneration/ssim_{s}"] <= 1
  with Image.open(out / "regeneration_sheet.png") as im:
    im.load()
    assert im.size[0] > im.size[1] > 300  # 7 columns (original + 2 per scale), 4 rows.


@pytest.mark.slow
def test_cli_same_numbers_twice_and_on_image_only_data(mixed_run, tmp_path):
  args = (f"--workdir={mixed_run}", "--task=regeneration", "--cfg=n_boot=20")
  a = run_eval(*args, f"--out={tmp_path / 'a'}")
  b = run_eval(*args, f"--out={tmp_path / 'b'}", "--cfg=dataset='image_only'")
  assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
  ma = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]
  mb = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
  ref = tmp_path / "c"
  c = run_eval(*args, f"--out={ref}")
  assert c.returncode == 0
  assert json.loads((ref / "metrics.json").read_text())["metrics"] == ma  # Fixed masks.
  assert (
    mb["regeneration/n_images"] > 0 and mb["regeneration/psnr_1x1"] != ma["regeneration/psnr_1x1"]
  )


def test_convirt_run_gives_one_error_line(short_run, tmp_path):
  out = tmp_path / "regen"
  proc = run_eval(f"--workdir={short_run}", "--task=regeneration", f"--out={out}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-2000:]
  assert "regeneration needs a model family with a pixel decoder" in errors[0]
  assert "Traceback" not in proc.stderr and not out.exists()
