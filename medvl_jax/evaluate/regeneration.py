"""Regeneration of masked patches: PSNR and SSIM per masking scale, against two baselines.

Held-out images: `dataset='paired'` (default) reads `splits` (validation + test) of the run's
paired dataset (`features.load_sample_split`); `dataset='image_only'` the same splits of the
bundled sample's image-only corpus (NIH ChestX-ray14 images, another institute). Images get the
eval transform of training (centre crop to data.image_size).

Masks: for each scale of the model's multi-scale masking (`model.image_mask`: block side in
patches and ratio, names like '4x4'), every image gets its own block mask drawn from a key
folded from (`seed`, scale index, image index): the same images, seed and config always give
the same masks, independent of batch size.

Regeneration: `MixedModel.regenerate(..., denorm='visible')`: with per-patch-normalised pixel
targets, the prediction returns to pixels through the mean/std of the image's *visible* patches,
so nothing about a masked patch (not even its mean or contrast) reaches its regeneration.
Baselines (the same masks): `meanfill`, every masked pixel set to the mean of the image's
visible pixels; `blurfill`, masked pixels from a normalised convolution of the visible context
(Gaussian blur of image*visible divided by the blur of visible; sigma = `blur_sigma` times the
masked block's side in pixels; pixels that the blur does not reach get the visible mean).

Metrics (pixels on 0..255, data range 255), each computed per image on its masked pixels only:
  PSNR = 10 log10(255^2 / MSE), MSE over the masked pixels; an exact fill (MSE 0) is +inf and
    is counted as PSNR_CAP dB in averages.
  SSIM: the SSIM map of Wang et al. (2004) on the whole image (masked pixels filled, visible
    pixels original), Gaussian window sigma 1.5 truncated at 3.5 sigma (11x11), K1 0.01, K2 0.03,
    population (co)variances, reflected borders (scikit-image's `structural_similarity` with
    gaussian_weights=True, use_sample_covariance=False, full=True gives the same map), averaged
    over the masked pixels.
Each scale yields regeneration/{psnr,ssim}_<scale> (the model), {psnr,ssim}_meanfill_<scale>,
{psnr,ssim}_blurfill_<scale> and psnr_gain_<scale> (model minus meanfill PSNR, per image, then
averaged): means over images with 95% CIs by bootstrap over patients (`_ci_lo`, `_ci_hi`);
plus regeneration/n_images. write_plots: regeneration_sheet.png (original / masked /
regenerated per scale for the first `sheet_n` images).
"""

from collections.abc import Iterator
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medvl_jax.data import augment, records, sources
from medvl_jax.errors import ConfigError, DataError
from medvl_jax.evaluate import features, metrics, plots
from medvl_jax.losses import masking

PSNR_CAP = 100.0  # dB; an exact fill (MSE 0, PSNR +inf) counts as this in averages.
DATA_RANGE = 255.0
DATASETS = ("paired", "image_only")
_SSIM_SIGMA, _SSIM_TRUNCATE, _K1, _K2 = 1.5, 3.5, 0.01, 0.03


# ----------------------------------------------------------------------------- metrics
def psnr(target: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
  """PSNR (dB, data range 255) over the pixels where `mask` is True; +inf for an exact fill."""
  diff = (np.asarray(pred, np.float64) - np.asarray(target, np.float64))[np.asarray(mask, bool)]
  if not diff.size:
    raise ValueError("psnr: the mask selects no pixel")
  mse = float(np.mean(diff**2))
  return float("inf") if mse == 0 else float(10 * np.log10(DATA_RANGE**2 / mse))


def ssim_map(target: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Per-pixel SSIM of two [H, W] images on 0..255 (see the module docstring)."""
  x, y = np.asarray(target, np.float64), np.asarray(pred, np.float64)

  def blur(a):
    return ndimage.gaussian_filter(a, _SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect")

  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  c1, c2 = (_K1 * DATA_RANGE) ** 2, (_K2 * DATA_RANGE) ** 2
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(target: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
  """SSIM map of the whole [H, W] images averaged over the pixels where `mask` is True."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("ssim: the mask selects no pixel")
  return float(ssim_map(target, pred)[mask].mean())


# ----------------------------------------------------------------------------- baselines
def mean_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[H, W] image with the pixels where `mask` is True set to the mean of the others."""
  image, mask = np.asarray(image, np.float64), np.asarray(mask, bool)
  return np.where(mask, image[~mask].mean(), image)


def blur_fill(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
  """[H, W] image with masked pixels from a normalised convolution of the visible ones."""
  image, mask = np.asarray(image, np.float64), np.asarray(mask, bool)
  visible = (~mask).astype(np.float64)

  def blur(a):
    return ndimage.gaussian_filter(a, sigma, mode="constant", cval=0.0)

  num, den = blur(image * visible), blur(visible)
  reached = den > 1e-6
  fill = np.where(reached, num / np.where(reached, den, 1.0), image[~mask].mean())
  return np.where(mask, fill, image)


# ----------------------------------------------------------------------------- data
def load_image_only(config: Any, split: str) -> dict[str, np.ndarray]:
  """A split of the bundled sample's image-only corpus: {'image' uint8 [N,S,S,1], 'patient_id'}."""
  sources.prepare(config)  # Checks (for the sample: prepares) every train source of the run.
  builder = sources.prepared_builder(config, "cxr_sample", "image_only")
  if split not in builder.info.splits:
    raise DataError(
      f"cxr_sample/image_only: no split {split!r}; has {', '.join(builder.info.splits)}"
    )
  size, resize = int(config.data.image_size), int(config.data.resize)
  ds = records.decoded_split(builder, split)
  ds = ds.map(
    lambda ex: {
      "patient_id": ex["patient_id"],
      "image": augment.to_uint8(augment.center_crop(ex["image"], size, resize)),
    }
  )
  rows = list(ds.as_numpy_iterator())
  return {
    "image": np.stack([r["image"] for r in rows])
    if rows
    else np.zeros((0, size, size, 1), np.uint8),
    "patient_id": np.asarray([r["patient_id"].decode("utf-8") for r in rows]),
  }


def draw_masks(
  mask_cfg: masking.ImageMaskConfig, scale_index: int, n: int, seed: int
) -> np.ndarray:
  """bool [n, P] block masks of scale `scale_index`, one key per (seed, scale, image)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), scale_index)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  block, ratio = mask_cfg.scales[scale_index], mask_cfg.ratios[scale_index]
  draw = jax.vmap(lambda k: masking.block_mask(k, 1, mask_cfg.grid, block, ratio)[0])
  return np.asarray(draw(keys))


def pixel_mask(patch_mask: np.ndarray, patch: int, grid: int) -> np.ndarray:
  """bool [N, P] patch mask -> bool [N, grid*patch, grid*patch] pixel mask."""
  m = np.asarray(patch_mask).reshape(-1, grid, grid)
  return np.repeat(np.repeat(m, patch, axis=1), patch, axis=2)


# ----------------------------------------------------------------------------- evaluator
class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('regeneration/<metric>', value)."""

  def __init__(
    self,
    encoders: features.Encoders,
    *,
    dataset: str = "paired",
    splits=("validation", "test"),
    seed: int = 0,
    blur_sigma: float = 0.5,
    batch_size: int = 32,
    n_boot: int = 1000,
    sheet_n: int = 4,
  ):
    model = encoders.model
    if not hasattr(model, "regenerate"):
      raise ConfigError(
        "regeneration needs a model family with a pixel decoder: model "
        f"{encoders.config.model.name!r} ({type(model).__name__}) has no "
        "regenerate method (use a mixed-family run, configs/mixed.py)"
      )
    if dataset not in DATASETS:
      raise ConfigError(f"regeneration: dataset {dataset!r} unknown; valid: {', '.join(DATASETS)}")
    self.enc, self.model, self.dataset = encoders, model, dataset
    self.splits = (splits,) if isinstance(splits, str) else tuple(splits)
    self.seed, self.blur_sigma, self.batch_size = int(seed), float(blur_sigma), int(batch_size)
    self.n_boot, self.sheet_n = int(n_boot), int(sheet_n)
    self.mask_cfg = model.image_mask
    self.patch = model.vit_config.patch_size
    self.scale_names = model.scale_names
    cls = type(model)
    self._regen = jax.jit(
      lambda v, x, m: model.apply(v, x, m, denorm="visible", method=cls.regenerate)["image"]
    )
    self._data: dict[str, np.ndarray] | None = None
    self.details: dict[str, Any] = {}

  def _images(self) -> dict[str, np.ndarray]:
    """Pixels and patients, loaded once per evaluator."""
    if self._data is None:
      cfg = self.enc.config
      load = features.load_sample_split if self.dataset == "paired" else load_image_only
      parts = [load(cfg, s) for s in self.splits]
      self._data = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "patient_id")}
      if not len(self._data["image"]):
        raise DataError(
          f"regeneration: splits {self.splits} of the {self.dataset} data hold no image"
        )
    return self._data

  def _regenerate(self, variables, images: np.ndarray, patch_mask: np.ndarray) -> np.ndarray:
    """float [N, S, S] regenerations (0..255), in fixed-size padded batches."""
    out, b = [], self.batch_size
    for i in range(0, len(images), b):
      x, m = images[i : i + b], patch_mask[i : i + b]
      pad = b - len(x)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      m = np.concatenate([m, np.zeros((pad,) + m.shape[1:], bool)])
      out.append(np.asarray(jax.device_get(self._regen(variables, x, m)))[: b - pad, ..., 0])
    return np.concatenate(out)

  def _emit(self, name: str, per_image: np.ndarray, patients) -> Iterator[tuple[str, float]]:
    ci = metrics.bootstrap_ci(
      lambda r: float(per_image[r].mean()), patients, n_boot=self.n_boot, seed=self.seed
    )
    yield f"regeneration/{name}", float(per_image.mean())
    yield f"regeneration/{name}_ci_lo", ci["lo"]
    yield f"regeneration/{name}_ci_hi", ci["hi"]

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    variables = features.variables_of(state)
    data = self._images()
    images, patients = data["image"], data["patient_id"]
    originals = images[..., 0].astype(np.float64)
    grid = self.mask_cfg.grid
    self.details = {
      "originals": images[: self.sheet_n],
      "masked": [],
      "regenerated": [],
      "patient_id": patients,
      "per_image": {},  # {scale: {'psnr', 'psnr_gain'}: float [N]}, the rows of `patient_id`
    }
    for k, scale in enumerate(self.scale_names):
      patch_mask = draw_masks(self.mask_cfg, k, len(images), self.seed)
      pix = pixel_mask(patch_mask, self.patch, grid)
      regen = self._regenerate(variables, images, patch_mask)
      sigma = self.blur_sigma * self.mask_cfg.scales[k] * self.patch
      fills = {
        "": regen,
        "_meanfill": np.stack([mean_fill(o, m) for o, m in zip(originals, pix)]),
        "_blurfill": np.stack([blur_fill(o, m, sigma) for o, m in zip(originals, pix)]),
      }
      psnrs = {}
      for suffix, filled in fills.items():
        psnrs[suffix] = np.minimum(
          [psnr(o, f, m) for o, f, m in zip(originals, filled, pix)], PSNR_CAP
        )
        ssims = np.array([ssim(o, f, m) for o, f, m in zip(originals, filled, pix)])
        yield from self._emit(f"psnr{suffix}_{scale}", psnrs[suffix], patients)
        yield from self._emit(f"ssim{suffix}_{scale}", ssims, patients)
      gain = psnrs[""] - psnrs["_meanfill"]
      yield from self._emit(f"psnr_gain_{scale}", gain, patients)
      self.details["per_image"][scale] = {"psnr": psnrs[""], "psnr_gain": gain}
      shown = slice(0, self.sheet_n)
      self.details["masked"].append(np.where(pix[shown], 0, images[shown, ..., 0]).astype(np.uint8))
      self.details["regenerated"].append(np.clip(np.round(regen[shown]), 0, 255).astype(np.uint8))
    yield "regeneration/n_images", float(len(images))

  def write_plots(self, out: pathlib.Path) -> list[str]:
    """regeneration_sheet.png: original / masked (black) / regenerated for each scale."""
    d = self.details
    plots.regeneration_sheet(
      pathlib.Path(out) / "regeneration_sheet.png",
      d["originals"],
      d["masked"],
      d["regenerated"],
      self.scale_names,
    )
    return ["regeneration_sheet.png"]
