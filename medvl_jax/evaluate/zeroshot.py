"""Zero-shot classification from text prompts: no training, only the two projected towers.

Each class has a set of prompt sentences (`prompts`, config). A class embedding is the mean of
the L2-normalised text embeddings z_u of its prompts; an image's score for a class is the cosine
between its L2-normalised embedding z_v and the class embedding (normalised again, so a score
is a cosine). The prediction is the class of highest score.

  * Two classes: binary task, the first class is the positive one; the ranking score is
    cos(image, positive) - cos(image, negative) (the order of a softmax over the two, as
    CheXzero's positive/negative prompt pairs). Reported: AUC with a 95% bootstrap CI over
    patients, and accuracy of the argmax.
  * More classes: accuracy of the argmax (with CI), and one-vs-rest AUC per class (cosine with
    that class) and their macro mean.
Undefined values (e.g. AUC without positives) are None (`null` in metrics.json).

Rows on the bundled sample: frontal views of `splits` (default: validation + test, the linear
probe's test rows), findings in `exclude` dropped. A row belongs to the first class whose name
its finding starts with ('COVID-19, ARDS' -> 'COVID-19'); a row matching no class belongs to the
class named `other` ('other' by default) if there is one, else it is dropped.

Prompts for CheXpert labels (e.g. CheXpert 5x200, the multi-class zero-shot benchmark of
GLoRIA/MedCLIP) follow the same shape; `CHEXPERT_PROMPTS` below is an example set written in
the style of ConVIRT's CheXpert category sentences (findings phrased as a radiologist would),
to be passed as `--cfg prompts=...` or in `config.evaluators`. It is an illustration, not the
prompt set of any paper.
"""

from collections.abc import Iterator
import pathlib
from typing import Any

import numpy as np

from medvl_jax.errors import ConfigError
from medvl_jax.evaluate import features, metrics, plots

# The sample task: COVID-19 vs other findings, phrased like the sample's clinical notes.
DEFAULT_PROMPTS = {
  "COVID-19": [
    "Bilateral peripheral ground-glass opacities consistent with COVID-19 pneumonia.",
    "Patchy bilateral consolidation in a patient positive for SARS-CoV-2.",
    "Multifocal peripheral airspace opacities typical of viral pneumonia.",
    "Diffuse bilateral interstitial infiltrates in a patient with COVID-19.",
  ],
  "other": [
    "Lobar consolidation of the right lower lobe consistent with bacterial pneumonia.",
    "Diffuse bilateral reticular opacities consistent with Pneumocystis pneumonia.",
    "Focal airspace opacity compatible with community-acquired pneumonia.",
    "No acute cardiopulmonary abnormality.",
  ],
}

# Example for CheXpert labels (multi-class, one finding per image as in CheXpert 5x200).
CHEXPERT_PROMPTS = {
  "Atelectasis": [
    "Mild bibasilar atelectasis.",
    "Subsegmental atelectasis at the left base.",
    "Linear atelectasis in the right lower lobe.",
  ],
  "Cardiomegaly": [
    "The heart is enlarged.",
    "Moderate cardiomegaly.",
    "Stable cardiomegaly with enlarged cardiac silhouette.",
  ],
  "Consolidation": [
    "Focal consolidation in the right lower lobe.",
    "Dense consolidation of the left lower lobe.",
    "Airspace consolidation concerning for pneumonia.",
  ],
  "Edema": [
    "Mild pulmonary edema.",
    "Moderate interstitial pulmonary edema.",
    "Vascular congestion with pulmonary edema.",
  ],
  "Pleural Effusion": [
    "Small left pleural effusion.",
    "Moderate bilateral pleural effusions.",
    "Large right pleural effusion.",
  ],
}


def class_embeddings(prompt_z: list[np.ndarray]) -> np.ndarray:
  """[C, d]: per class, the mean of its L2-normalised prompt embeddings, L2-normalised."""
  return features.l2_normalize(np.stack([features.l2_normalize(z).mean(0) for z in prompt_z]))


def class_scores(image_z: np.ndarray, class_z: np.ndarray) -> np.ndarray:
  """[N, C] cosine of every image embedding with every class embedding."""
  return features.l2_normalize(image_z) @ features.l2_normalize(class_z).T


def assign_classes(findings: np.ndarray, classes: list[str], other: str) -> np.ndarray:
  """Class index per finding (-1: no class): first class name that prefixes it, else `other`."""
  out = np.full(len(findings), -1)
  fallback = classes.index(other) if other in classes else -1
  for i, f in enumerate(findings.astype(str)):
    match = [c for c, name in enumerate(classes) if name != other and f.startswith(name)]
    out[i] = match[0] if match else fallback
  return out


class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('zeroshot/<metric>', value)."""

  def __init__(
    self,
    encoders: features.Encoders,
    *,
    prompts: dict | None = None,
    other: str = "other",
    exclude=("todo",),
    frontal_only: bool = True,
    splits=("validation", "test"),
    n_boot: int = 1000,
    seed: int = 0,
  ):
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    if len(prompts) < 2:
      raise ConfigError(f"zeroshot: prompts need at least 2 classes, got {list(prompts)}")
    for name, sentences in prompts.items():
      if (
        isinstance(sentences, str)
        or not sentences
        or not all(isinstance(s, str) and s.strip() for s in sentences)
      ):
        raise ConfigError(
          f"zeroshot: class {name!r} needs a non-empty list of prompt sentences, got {sentences!r}"
        )
    self.enc, self.prompts, self.other = encoders, {k: list(v) for k, v in prompts.items()}, other
    self.classes = list(self.prompts)
    self.exclude, self.frontal_only, self.splits = tuple(exclude), frontal_only, tuple(splits)
    self.n_boot, self.seed = n_boot, seed
    self._data = None
    self.details: dict[str, Any] = {}

  def _load(self) -> dict[str, np.ndarray]:
    if self._data is None:
      parts = [
        features.load_sample_split(self.enc.config, s, self.frontal_only) for s in self.splits
      ]
      d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      d["label"] = assign_classes(d["finding"], self.classes, self.other)
      keep = ~np.isin(d["finding"], self.exclude) & (d["label"] >= 0)
      self._data = {k: v[keep] for k, v in d.items()}
    return self._data

  def scores(self, state: Any, images: np.ndarray) -> np.ndarray:
    variables = features.variables_of(state)
    flat = [s for c in self.classes for s in self.prompts[c]]
    z_text = self.enc.texts(variables, flat)
    bounds = np.cumsum([0] + [len(self.prompts[c]) for c in self.classes])
    class_z = class_embeddings([z_text[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    _, z_image = self.enc.images(variables, images)
    return class_scores(z_image, class_z)

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    data = self._load()
    y, patients = data["label"], data["patient_id"]
    s = self.scores(state, data["image"])
    pred = s.argmax(1)
    self.details = {"curves": {}, "n": len(y)}
    acc = metrics.accuracy(y, pred)
    acc_ci = metrics.bootstrap_ci(
      lambda r: metrics.accuracy(y[r], pred[r]), patients, n_boot=self.n_boot, seed=self.seed
    )
    if len(self.classes) == 2:
      margin = s[:, 0] - s[:, 1]
      pos = (y == 0).astype(int)
      auc = metrics.roc_auc(pos, margin)
      ci = metrics.bootstrap_ci(
        lambda r: metrics.roc_auc(pos[r], margin[r], True),
        patients,
        n_boot=self.n_boot,
        seed=self.seed,
      )
      curve = metrics.roc_curve(pos, margin)
      if curve is not None:
        self.details["curves"][f"{self.classes[0]} vs {self.classes[1]}"] = (*curve, auc)
      yield "zeroshot/auc", auc
      yield "zeroshot/auc_ci_lo", ci["lo"]
      yield "zeroshot/auc_ci_hi", ci["hi"]
    else:
      onehot = (y[:, None] == np.arange(len(self.classes))).astype(int)
      macro, per_class = metrics.macro_auc(onehot, s)
      ci = metrics.bootstrap_ci(
        lambda r: metrics.macro_auc(onehot[r], s[r], True)[0],
        patients,
        n_boot=self.n_boot,
        seed=self.seed,
      )
      yield "zeroshot/auc_macro", macro
      yield "zeroshot/auc_macro_ci_lo", ci["lo"]
      yield "zeroshot/auc_macro_ci_hi", ci["hi"]
      for c, (name, a) in enumerate(zip(self.classes, per_class)):
        yield f"zeroshot/auc/{name}", a
        curve = metrics.roc_curve(onehot[:, c], s[:, c])
        if curve is not None:
          self.details["curves"][name] = (*curve, a)
    yield "zeroshot/acc", acc
    yield "zeroshot/acc_ci_lo", acc_ci["lo"]
    yield "zeroshot/acc_ci_hi", acc_ci["hi"]
    yield "zeroshot/n_test", float(len(y))
    for c, name in enumerate(self.classes):
      yield f"zeroshot/prevalence/{name}", float(np.mean(y == c)) if len(y) else None

  def write_plots(self, out: pathlib.Path) -> list[str]:
    title = (
      f"zero-shot: {' / '.join(self.classes)} (n={self.details.get('n', 0)}"
      f"{', ROC undefined' if not self.details.get('curves') else ''})"
    )
    plots.roc_curves(out / "zeroshot_roc.png", self.details.get("curves", {}), title)
    return ["zeroshot_roc.png"]
