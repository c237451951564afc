"""PNG figures drawn with matplotlib (Agg, no display needed): ROC curves, retrieval sheets,
metric comparisons of evaluations (`--compare`), and regeneration sheets (original / masked /
regenerated per scale, for masked-image models).

Each `*_figure` function builds and returns a `matplotlib.figure.Figure` (no pyplot, no global
state or backend switch, so it is safe in a training process; PNGs are rendered by Agg); the
matching writer saves it to PNG atomically (a temporary file in the same directory, renamed
into place).
"""

from collections.abc import Sequence
import os
import pathlib
import secrets
import textwrap
from typing import Any

from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

HIT, MISS = "#00aa00", "#dc0000"


def save(fig: Figure, path: pathlib.Path, dpi: int = 100) -> None:
  """Writes `fig` to `path` (PNG, rendered by Agg whatever the process's backend) atomically."""
  path = pathlib.Path(path)
  FigureCanvasAgg(fig)
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
  try:
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  return image[..., 0] if image.ndim == 3 else image


# ----------------------------------------------------------------------------- ROC
def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> Figure:
  """ROC curves {name: (fpr, tpr, auc)} on one square plot, AUCs in the legend, chance line."""
  fig = Figure(figsize=(6, 6.4))
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance (AUC 0.500)")
  for name, (fpr, tpr, auc) in curves.items():
    auc_text = "n/a" if auc is None else f"{auc:.3f}"
    ax.plot(fpr, tpr, linewidth=2, drawstyle="default", label=f"{name} (AUC {auc_text})")
  if not curves:
    ax.text(
      0.5,
      0.5,
      "no ROC curve defined\n(a class without positives or negatives)",
      ha="center",
      va="center",
      transform=ax.transAxes,
    )
  ax.set(
    xlim=(0, 1),
    ylim=(0, 1.01),
    xlabel="false positive rate",
    ylabel="true positive rate",
    title="\n".join(textwrap.wrap(title, 60)),
    aspect="equal",
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  return fig


def roc_curves(
  path: pathlib.Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str
) -> None:
  save(roc_figure(curves, title), path)


# ----------------------------------------------------------------------------- retrieval
def retrieval_figure(
  queries: list[str], scores: np.ndarray, relevant: np.ndarray, images: np.ndarray, k: int = 5
) -> Figure:
  """One row per text query: the wrapped query, then its top-k images by score, each framed
  green (hit) or red (miss) and captioned with rank and cosine similarity."""
  n = max(len(queries), 1)
  fig = Figure(figsize=(3 + 1.6 * k, 1.9 * n + 0.5))
  grid = fig.add_gridspec(n, k + 1, width_ratios=[2.2] + [1] * k)
  fig.suptitle(f"text -> image, top {k} (green frame = hit, red = miss)")
  for r, query in enumerate(queries):
    ax = fig.add_subplot(grid[r, 0])
    ax.axis("off")
    ax.text(0, 0.5, "\n".join(textwrap.wrap(query, 34)[:7]), va="center", fontsize=8)
    order = np.argsort(-scores[r], kind="stable")[:k]
    for j, c in enumerate(order):
      ax = fig.add_subplot(grid[r, j + 1])
      ax.imshow(_gray(images[c]), cmap="gray", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      hit = bool(relevant[r, c])
      for side in ax.spines.values():
        side.set(color=HIT if hit else MISS, linewidth=4)
      ax.set_xlabel(f"#{j + 1} {scores[r, c]:.2f} {'hit' if hit else 'miss'}", fontsize=8)
  fig.tight_layout()
  return fig


def retrieval_sheet(
  path: pathlib.Path,
  queries: list[str],
  scores: np.ndarray,
  relevant: np.ndarray,
  images: np.ndarray,
  k: int = 5,
) -> None:
  save(retrieval_figure(queries, scores, relevant, images, k), path)


# ----------------------------------------------------------------------------- regeneration
def regeneration_figure(
  originals: np.ndarray,
  masked: Sequence[np.ndarray],
  regenerated: Sequence[np.ndarray],
  scale_names: Sequence[str],
) -> Figure:
  """One row per image: the original, then for each scale its masked input and the model's
  regeneration. originals: [N, H, W] or [N, H, W, 1] (uint8 0..255 or float 0..1); masked and
  regenerated: one array like `originals` per scale, in `scale_names` order."""
  if not len(masked) == len(regenerated) == len(scale_names):
    raise ValueError(
      f"regeneration_figure: {len(masked)} masked, {len(regenerated)} "
      f"regenerated arrays for {len(scale_names)} scale names"
    )
  originals = np.asarray(originals)
  n, cols = len(originals), 1 + 2 * len(scale_names)
  vmax = 255 if originals.dtype == np.uint8 else 1.0
  fig = Figure(figsize=(1.8 * cols, 1.9 * n + 0.4))
  titles = ["original"] + [f"{s} {what}" for s in scale_names for what in ("masked", "regenerated")]
  for i in range(n):
    row = [originals[i]] + [a[i] for pair in zip(masked, regenerated) for a in pair]
    for j, (image, title) in enumerate(zip(row, titles)):
      ax = fig.add_subplot(n, cols, i * cols + j + 1)
      ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=vmax)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def regeneration_sheet(
  path: pathlib.Path,
  originals: np.ndarray,
  masked: Sequence[np.ndarray],
  regenerated: Sequence[np.ndarray],
  scale_names: Sequence[str],
) -> None:
  save(regeneration_figure(originals, masked, regenerated, scale_names), path)


# ----------------------------------------------------------------------------- --compare
def comparison_figure(runs: list[dict[str, Any]], names: list[str], labels: list[str]) -> Figure:
  """One bar chart per metric (`names`) across the compared evaluations (`runs`, their
  metrics.json dicts, shown as `labels`), with the bootstrap CI as an error bar where present;
  undefined values are left out and marked 'n/a'."""
  cols = min(4, max(len(names), 1))
  rows = max(1, -(-len(names) // cols))
  fig = Figure(figsize=(3.6 * cols, 3.0 * rows + 0.6))
  x = np.arange(len(runs))
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    for j, r in enumerate(runs):
      m = r["metrics"]
      v = m.get(name)
      if v is None:
        ax.text(j, 0, "n/a", ha="center", va="bottom", fontsize=8)
        continue
      lo, hi = m.get(f"{name}_ci_lo"), m.get(f"{name}_ci_hi")
      err = None if lo is None or hi is None else [[max(v - lo, 0)], [max(hi - v, 0)]]
      ax.bar(j, v, color=f"C{j % 10}", yerr=err, capsize=4, label=labels[j])
    ax.set_xticks(x, [str(j + 1) for j in x])
    ax.set(title=name, xlabel="evaluation", ylabel="value")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
  handles = [
    patches.Patch(color=f"C{j % 10}", label=f"{j + 1}: {label}") for j, label in enumerate(labels)
  ]
  fig.legend(handles=handles, loc="upper center", ncols=min(len(labels), 3), fontsize="small")
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
  return fig


def comparison_chart(
  path: pathlib.Path, runs: list[dict[str, Any]], names: list[str], labels: list[str]
) -> None:
  save(comparison_figure(runs, names, labels), path)


def training_curves_figure(curves: dict[str, dict[str, tuple[list, list]]]) -> Figure:
  """The compared runs' training curves: one panel per tag (train_loss, val_loss), one line per
  run (`curves`: run label -> tag -> (steps, values), read from each run's TensorBoard)."""
  tags = sorted({tag for per_run in curves.values() for tag in per_run})
  fig = Figure(figsize=(5.0 * max(len(tags), 1), 3.6))
  for i, tag in enumerate(tags):
    ax = fig.add_subplot(1, max(len(tags), 1), i + 1)
    for j, (label, per_run) in enumerate(curves.items()):
      if tag in per_run:
        steps, values = per_run[tag]
        ax.plot(
          steps, values, marker="." if len(steps) < 20 else None, color=f"C{j % 10}", label=label
        )
    ax.set(title=tag, xlabel="step", ylabel=tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def training_curves(path: pathlib.Path, curves: dict[str, dict[str, tuple[list, list]]]) -> None:
  save(training_curves_figure(curves), path)
