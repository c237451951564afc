"""matplotlib figures of the evaluators (inspected as Figure objects, then opened as PNGs with
PIL) and the progress bars of long passes."""

import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from medvl_jax import progress
from medvl_jax.evaluate import metrics, plots, runs
from tests.conftest import run_eval


def _open_png(path: pathlib.Path) -> tuple[int, int]:
  with Image.open(path) as im:
    im.load()
    assert im.format == "PNG"
    return im.size


def _no_temporaries(folder: pathlib.Path):
  assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_roc_figure_axes_legend_auc(tmp_path):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 100)
  s = rng.normal(size=100) + y
  fpr, tpr = metrics.roc_curve(y, s)
  auc = metrics.roc_auc(y, s)
  fig = plots.roc_figure({"COVID-19": (fpr, tpr, auc), "other": (fpr, tpr, None)}, "a title")
  (ax,) = fig.axes
  assert ax.get_xlabel() == "false positive rate" and ax.get_ylabel() == "true positive rate"
  assert ax.get_title() == "a title"
  texts = [t.get_text() for t in ax.get_legend().get_texts()]
  assert f"COVID-19 (AUC {auc:.3f})" in texts and "other (AUC n/a)" in texts
  assert all("AUC" in t for t in texts)
  # The plotted curve is the one given.
  line = [l for l in ax.get_lines() if l.get_label().startswith("COVID-19")][0]
  np.testing.assert_array_equal(line.get_xdata(), fpr)
  np.testing.assert_array_equal(line.get_ydata(), tpr)
  plots.roc_curves(tmp_path / "roc.png", {"COVID-19": (fpr, tpr, auc)}, "t")
  w, h = _open_png(tmp_path / "roc.png")
  assert w >= 400 and h >= 400
  _no_temporaries(tmp_path)


def test_retrieval_figure_frames_hits_green_misses_red(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
  scores = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0], [0.0, 0.5, 0.1, 0.9, 0.2, 0.3]])
  relevant = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]], bool)
  fig = plots.retrieval_figure(["query one", "query two"], scores, relevant, images, k=3)
  tiles = [ax for ax in fig.axes if ax.images]
  assert len(tiles) == 6
  # Row 0: ranks are candidates 0 (hit), 2, 4; row 1: 3 (hit), 1, 5 (hit).
  want = ["hit", "miss", "miss", "hit", "miss", "hit"]
  for ax, w in zip(tiles, want):
    assert ax.get_xlabel().endswith(w)
    colour = ax.spines["left"].get_edgecolor()
    assert np.allclose(colour[:3], (0, 0xAA / 255, 0) if w == "hit" else (0xDC / 255, 0, 0))
  np.testing.assert_array_equal(tiles[0].images[0].get_array(), images[0, ..., 0])
  plots.retrieval_sheet(tmp_path / "sheet.png", ["q1", "q2"], scores, relevant, images, k=3)
  _open_png(tmp_path / "sheet.png")


def test_regeneration_sheet(tmp_path):
  rng = np.random.default_rng(2)
  orig = rng.random((2, 16, 16))
  masked = [orig * (rng.random(orig.shape) > 0.5) for _ in range(2)]
  regen = [orig + 0.01, orig - 0.01]
  fig = plots.regeneration_figure(orig, masked, regen, ["16px", "32px"])
  assert len(fig.axes) == 2 * 5
  assert [ax.get_title() for ax in fig.axes[:5]] == [
    "original",
    "16px masked",
    "16px regenerated",
    "32px masked",
    "32px regenerated",
  ]
  np.testing.assert_array_equal(fig.axes[5 + 4].images[0].get_array(), regen[1][1])
  plots.regeneration_sheet(tmp_path / "regen.png", orig, masked, regen, ["16px", "32px"])
  _open_png(tmp_path / "regen.png")
  with pytest.raises(ValueError, match="scale names"):
    plots.regeneration_figure(orig, masked, regen[:1], ["16px", "32px"])


def _evaluation(folder: pathlib.Path, workdir: str, step: int, auc: float | None) -> str:
  folder.mkdir()
  m = {
    "probe/auc": auc,
    "probe/auc_ci_lo": None if auc is None else auc - 0.1,
    "probe/auc_ci_hi": None if auc is None else auc + 0.05,
    "probe/acc": 0.75,
  }
  (folder / "metrics.json").write_text(
    json.dumps({"task": "linear_probe", "step": step, "workdir": workdir, "metrics": m})
  )
  return str(folder)


def test_compare_chart_one_panel_per_metric(tmp_path):
  dirs = [
    _evaluation(tmp_path / "a", "/runs/base", 3, 0.7),
    _evaluation(tmp_path / "b", "/runs/mixed", 9, None),
  ]
  evaluations = runs.read_evaluations(dirs)
  fig = plots.comparison_figure(evaluations, ["probe/auc", "probe/acc"], ["base @ 3", "mixed @ 9"])
  assert [ax.get_title() for ax in fig.axes] == ["probe/auc", "probe/acc"]
  auc_ax, acc_ax = fig.axes
  assert [p.get_height() for p in auc_ax.patches] == [0.7]  # Undefined: no bar, 'n/a'.
  assert "n/a" in [t.get_text() for t in auc_ax.texts]
  assert [p.get_height() for p in acc_ax.patches] == [0.75, 0.75]
  assert auc_ax.get_ylabel() == "value" and auc_ax.get_xlabel() == "evaluation"
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == ["1: base @ 3", "2: mixed @ 9"]
  # The CLI writes the chart next to the table, atomically.
  md = tmp_path / "out" / "cmp.md"
  md.parent.mkdir()
  proc = run_eval("--compare", *dirs, f"--out={md}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == md.read_text()
  assert "| probe/auc | 0.700 [0.600, 0.750] | n/a |" in proc.stdout
  _open_png(md.with_suffix(".png"))
  assert sorted(p.name for p in md.parent.iterdir()) == ["cmp.md", "cmp.png"]


def test_progress_bar_only_for_large_passes(capsys):
  assert list(progress.iterate(range(10), 10, "small")) == list(range(10))
  assert capsys.readouterr().err == ""
  os.environ.pop("TQDM_DISABLE", None)
  n = progress.MIN_IMAGES
  assert list(progress.iterate(range(n), n, "image features")) == list(range(n))
  err = capsys.readouterr().err
  assert "image features" in err and f"{n}/{n}" in err and "img/s" in err


def test_export_progress_only_for_large_files(tmp_path, capsys):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  from medvl_jax.interop import export_files  # pylint: disable=g-import-not-at-top

  os.environ.pop("TQDM_DISABLE", None)
  small = {"w": np.ones((4, 4), np.float64)}
  export_files.save_safetensors(small, tmp_path / "small.safetensors")
  assert capsys.readouterr().err == ""
  n = progress.MIN_EXPORT_BYTES // 4 + 1
  export_files.save_safetensors(
    {"a": np.ones(n, np.float32), "b": np.arange(3)}, tmp_path / "large.safetensors"
  )
  err = capsys.readouterr().err
  assert "export large.safetensors" in err and "100%" in err and "B/s" in err
  got = safetensors.numpy.load_file(str(tmp_path / "large.safetensors"))
  assert got["a"].shape == (n,) and got["b"].tolist() == [0, 1, 2]
