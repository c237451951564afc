"""Zero-shot retrieval: CheXpert 8x200 (ConVIRT) Precision@k and held-out pair Recall@k.

CheXpert 8x200 (docs/METHODS.md; files as published by ConVIRT, `shared/data/README.md` section 3):
  RETRIEVAL_DIR/image-retrieval/query.csv      Variable, Path          (80 image queries)
  RETRIEVAL_DIR/image-retrieval/candidate.csv  Path, ..., 14 labels    (1,600 candidates)
  RETRIEVAL_DIR/text-retrieval/query.csv       Variable, Text          (40 text queries)
  RETRIEVAL_DIR/text-retrieval/candidate.csv   identical to the image candidates
Paths are relative to `chexpert_dir` (the folder holding `CheXpert-v1.0-small/`). A candidate is
a hit for a query of category c iff its label for c is 1. Similarity: cosine of the projected
embeddings (image->image: z_v . z_v; text->image: z_u . z_v). Metric: Precision@k per query,
averaged; 95% CI by bootstrap over query patients (text queries: each its own group).

Held-out pairs (always; real data here): images of `pairs_split` of the run's paired dataset
and their full notes. image->text and text->image Recall@k; an image and a note match when they
belong to the same patient (follow-up images share notes). CI by bootstrap over patients.
"""

from collections.abc import Iterator
import csv
import io
import pathlib
import re
from typing import Any

import numpy as np

from medvl_jax.errors import DataError
from medvl_jax.evaluate import features, metrics, plots

CATEGORIES = (
  "Atelectasis",
  "Cardiomegaly",
  "Edema",
  "Fracture",
  "No Finding",
  "Pleural Effusion",
  "Pneumonia",
  "Pneumothorax",
)
FILES = {
  "image_query": ("image-retrieval/query.csv", ("Variable", "Path")),
  "candidate": ("image-retrieval/candidate.csv", ("Path",) + CATEGORIES),
  "text_query": ("text-retrieval/query.csv", ("Variable", "Text")),
}
_PATIENT = re.compile(r"(patient\d+)")


def read_csv(path: pathlib.Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
  """Rows of a CSV that must have `columns`; DataError (one line) otherwise."""
  if not path.is_file():
    raise DataError(f"{path}: not found")
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8") from None
  reader = csv.DictReader(io.StringIO(text, newline=""), restval=None)
  try:
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
      raise DataError(
        f"{path}: missing column(s) {', '.join(map(repr, missing))} "
        f"(has: {', '.join(h if h.isprintable() else repr(h) for h in reader.fieldnames or [])})"
      )
    rows = []
    for row in reader:
      if None in row or None in row.values():
        raise DataError(f"{path}: line {reader.line_num}: not as many cells as the header")
      rows.append(row)
  except csv.Error as e:
    raise DataError(f"{path}: line {reader.line_num}: {e}") from None
  if not rows:
    raise DataError(f"{path}: no rows")
  return rows


def read_8x200(retrieval_dir: pathlib.Path, chexpert_dir: pathlib.Path) -> dict[str, Any]:
  """Reads and checks the three CSVs and that every image they name exists."""
  rows = {k: read_csv(retrieval_dir / f, cols) for k, (f, cols) in FILES.items()}
  for key in ("image_query", "text_query"):
    bad = sorted({r["Variable"] for r in rows[key]} - set(CATEGORIES))
    if bad:
      raise DataError(
        f"{retrieval_dir / FILES[key][0]}: unknown categories {bad}; valid: {', '.join(CATEGORIES)}"
      )
  for key in ("image_query", "candidate"):
    paths = [chexpert_dir / r["Path"] for r in rows[key]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
      raise DataError(
        f"image not found: {missing[0]} (listed in "
        f"{retrieval_dir / FILES[key][0]}; {len(missing)} of {len(paths)} "
        f"missing under chexpert_dir={chexpert_dir})"
      )
  try:
    labels = np.array([[float(r[c] or 0) for c in CATEGORIES] for r in rows["candidate"]])
  except ValueError as e:
    raise DataError(f"{retrieval_dir / FILES['candidate'][0]}: bad label value: {e}") from e
  return {
    "candidate_paths": [chexpert_dir / r["Path"] for r in rows["candidate"]],
    "candidate_labels": labels == 1.0,
    "image_query_paths": [chexpert_dir / r["Path"] for r in rows["image_query"]],
    "image_query_cats": [r["Variable"] for r in rows["image_query"]],
    "image_query_patients": [_patient(r["Path"]) for r in rows["image_query"]],
    "text_queries": [r["Text"] for r in rows["text_query"]],
    "text_query_cats": [r["Variable"] for r in rows["text_query"]],
  }


def _patient(path: str) -> str:
  m = _PATIENT.search(path)
  return m.group(1) if m else path


def category_precision(
  query_emb: np.ndarray,
  query_cats: list[str],
  cand_emb: np.ndarray,
  cand_labels: np.ndarray,
  k: int,
) -> np.ndarray:
  """Per-query Precision@k: cosine ranking, a hit iff the candidate's label for the query's
  category is 1. cand_labels: bool [C, len(CATEGORIES)]."""
  scores = features.l2_normalize(query_emb) @ features.l2_normalize(cand_emb).T
  cat_index = np.array([CATEGORIES.index(c) for c in query_cats])
  return metrics.precision_at_k(scores, cand_labels[:, cat_index].T, k)


class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('retrieval/<metric>', value)."""

  def __init__(
    self,
    encoders: features.Encoders,
    *,
    chexpert_dir: str = "",
    retrieval_dir: str = "",
    ks=(5, 10, 50),
    recall_ks=(1, 5, 10),
    pairs_split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    sheet_k: int = 5,
  ):
    self.enc, self.ks, self.recall_ks = encoders, tuple(ks), tuple(recall_ks)
    self.pairs_split, self.n_boot, self.seed, self.sheet_k = pairs_split, n_boot, seed, sheet_k
    self.data = None
    if chexpert_dir:
      if not retrieval_dir:
        retrieval_dir = str(input_sample_dir(encoders.config) / "convirt_8x200")
      self.data = read_8x200(pathlib.Path(retrieval_dir), pathlib.Path(chexpert_dir))
    self.details: dict[str, Any] = {}
    self._pixels: dict[str, np.ndarray] = {}

  def _images(self, key: str) -> np.ndarray:
    """Pixels are loaded once per evaluator (the model changes, the images do not)."""
    if key not in self._pixels:
      if key == "pairs":
        self._pairs = features.load_sample_split(self.enc.config, self.pairs_split)
        self._pixels[key] = self._pairs["image"]
      else:
        self._pixels[key] = self.enc.load_image_files(self.data[f"{key}_paths"])
    return self._pixels[key]

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    variables = features.variables_of(state)
    self.details = {}
    if self.data is not None:
      yield from self._run_8x200(variables)
    yield from self._run_pairs(variables)

  def _ci(self, per_query: np.ndarray, groups) -> dict:
    return metrics.bootstrap_ci(
      lambda r: float(per_query[r].mean()), groups, n_boot=self.n_boot, seed=self.seed
    )

  def _emit(self, name: str, per_query: np.ndarray, groups) -> Iterator[tuple[str, float]]:
    ci = self._ci(per_query, groups)
    yield f"retrieval/{name}", float(per_query.mean())
    yield f"retrieval/{name}_ci_lo", ci["lo"]
    yield f"retrieval/{name}_ci_hi", ci["hi"]

  def _run_8x200(self, variables) -> Iterator[tuple[str, float]]:
    d = self.data
    _, cand = self.enc.images(variables, self._images("candidate"))
    _, img_q = self.enc.images(variables, self._images("image_query"))
    txt_q = self.enc.texts(variables, d["text_queries"])
    text_groups = [f"text{i}" for i in range(len(d["text_queries"]))]
    for k in self.ks:
      yield from self._emit(
        f"i2i_P@{k}",
        category_precision(img_q, d["image_query_cats"], cand, d["candidate_labels"], k),
        d["image_query_patients"],
      )
      yield from self._emit(
        f"t2i_P@{k}",
        category_precision(txt_q, d["text_query_cats"], cand, d["candidate_labels"], k),
        text_groups,
      )
    scores = features.l2_normalize(txt_q) @ features.l2_normalize(cand).T
    cat_index = [CATEGORIES.index(c) for c in d["text_query_cats"]]
    self.details["t2i_8x200"] = dict(
      queries=d["text_queries"],
      scores=scores,
      relevant=d["candidate_labels"][:, cat_index].T,
      images=self._images("candidate"),
    )

  def _run_pairs(self, variables) -> Iterator[tuple[str, float]]:
    images = self._images("pairs")
    pairs = self._pairs
    if len(images) < 2:
      raise DataError(
        f"split {self.pairs_split!r} of {self.enc.config.data.name} has "
        f"{len(images)} image-text pairs; need at least 2 for Recall@k"
      )
    _, z_v = self.enc.images(variables, images)
    z_u = self.enc.texts(variables, [str(t) for t in pairs["text"]])
    scores = features.l2_normalize(z_u) @ features.l2_normalize(z_v).T  # [text, image]
    patients = pairs["patient_id"]
    relevant = patients[:, None] == patients[None, :]
    for k in self.recall_ks:
      yield from self._emit(f"t2i_R@{k}", metrics.hit_at_k(scores, relevant, k), patients)
      yield from self._emit(f"i2t_R@{k}", metrics.hit_at_k(scores.T, relevant.T, k), patients)
    yield "retrieval/pairs_n", float(len(images))
    self.details["t2i_pairs"] = dict(
      queries=[str(t) for t in pairs["text"]], scores=scores, relevant=relevant, images=images
    )

  def write_plots(self, out: pathlib.Path) -> list[str]:
    """retrieval_sheet.png: queries (one per category for 8x200, else the first 8 notes) with
    their top-k images, hits framed green, misses red."""
    key = "t2i_8x200" if "t2i_8x200" in self.details else "t2i_pairs"
    d = self.details[key]
    if key == "t2i_8x200":
      cats = self.data["text_query_cats"]
      rows = [cats.index(c) for c in CATEGORIES if c in cats]
    else:
      rows = list(range(min(8, len(d["queries"]))))
    plots.retrieval_sheet(
      out / "retrieval_sheet.png",
      [d["queries"][r] for r in rows],
      d["scores"][rows],
      d["relevant"][rows],
      d["images"],
      self.sheet_k,
    )
    return ["retrieval_sheet.png"]


def input_sample_dir(config) -> pathlib.Path:
  from medvl_jax.data import sources  # pylint: disable=g-import-not-at-top

  return sources.resolve_sample_dir(config)
