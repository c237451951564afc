"""Fuzzing (hypothesis) of every parser of outside input: only the documented errors, ever.

Parsers and their one documented failure:
  report section parser (`common.parse_sections`, `report_fields`), sentence splitter: none;
    and they never invent text (everything returned comes from the input);
  Open-i XML (`openi_dataset_builder.parse_report`): `ReportError`;
  each builder's manifest readers (CSV, gzip CSV, split lists, label files, DICOM headers),
    run for real on files written into a scratch manual_dir (`_split_records`, the duplicate /
    containment check and `_generate_examples`): `DataError` (one line) for a bad file, a
    counted skip for a bad row, and no record whose image resolves outside manual_dir;
  the CheXpert 8x200 CSVs (`evaluate.retrieval.read_8x200`): `DataError` (one line);
  config overrides (`--config.x=...` through `cli.parse_flags`, in-process): `error: ...`
    on one line and exit 2, or a parsed config.

Inputs mix plausible values of each column with arbitrary text (NUL, quotes, newlines, any
Unicode, `..` and absolute paths, nan/inf) and byte-level damage (inserted bytes that are not
UTF-8, truncation, rows cut short or too long). The default suite runs `EXAMPLES[...]`
examples per parser, derandomised (the same inputs on every CI run); `-m slow` runs
`SLOW_EXAMPLES` more per parser from a seed that follows the code under test (a hash of every
.py file of medvl_jax/, data_pipelines/ and this file): a change to the parsers or to these
strategies explores new inputs, while the same code gets the same inputs, so a CI verdict can be
reproduced locally. MEDVL_FUZZ_SEED=<int> picks a seed, MEDVL_FUZZ_SEED=random a fresh one per
run (a local campaign). Counts and times: docs/RELIABILITY.md
(`pytest --hypothesis-show-statistics` prints them).
"""

import collections
import contextlib
import csv
import functools
import gzip
import hashlib
import io
import logging
import os
import pathlib
import re
import sys

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
import pytest

from data_pipelines import common, sentences
from medvl_jax import cli
from medvl_jax.errors import DataError

# ml_collections loads config files with importlib's deprecated load_module (once per example).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

# Examples per parser: default suite (derandomised) and the extra `slow` run (seed: module doc).
# MEDVL_FUZZ_SCALE multiplies both (a longer local campaign: MEDVL_FUZZ_SCALE=20).
_SCALE = float(os.environ.get("MEDVL_FUZZ_SCALE", "1"))
EXAMPLES = {"text": 1250, "xml": 1000, "builder": 125, "csv": 200, "flags": 400}
SLOW_EXAMPLES = {"text": 6250, "xml": 7000, "builder": 1875, "csv": 2800, "flags": 2600}
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _slow_seed() -> int | None:
  """The slow run's seed: MEDVL_FUZZ_SEED, or a hash of the code under test (module doc)."""
  chosen = os.environ.get("MEDVL_FUZZ_SEED", "")
  if chosen == "random":
    return None
  if chosen:
    return int(chosen)
  digest = hashlib.sha256()
  files = [pathlib.Path(__file__).resolve()]
  for package in ("medvl_jax", "data_pipelines"):
    files += (_ROOT / package).rglob("*.py")
  for path in sorted(files):
    digest.update(path.relative_to(_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
  return int.from_bytes(digest.digest()[:8], "big")


SLOW_SEED = _slow_seed()


def fuzz(strategy, kind: str, *, slow: bool = False):
  """given(strategy) with the example budget of `kind`, for the default or the slow run."""

  def wrap(fn):
    n = max(1, round((SLOW_EXAMPLES if slow else EXAMPLES)[kind] * _SCALE))
    test = settings(
      max_examples=n,
      deadline=None,
      derandomize=not slow,
      database=None,
      suppress_health_check=_HEALTH + [HealthCheck.function_scoped_fixture],
    )(given(strategy)(fn))
    if slow and SLOW_SEED is not None:
      test = seed(SLOW_SEED)(test)
    return pytest.mark.slow(test) if slow else test

  return wrap


@pytest.fixture(scope="module", autouse=True)
def quiet_skips():
  """Every skipped row logs a warning: thousands here, so only errors are kept."""
  logger = logging.getLogger("absl")
  old = logger.level
  logger.setLevel(logging.ERROR)
  yield
  logger.setLevel(old)


# ----------------------------------------------------------------------------- strategies

ODD = (
  "",
  " ",
  "nan",
  "inf",
  "-inf",
  "1e309",
  "-1.0",
  "2",
  "0.5",
  "../../outside.png",
  "/etc/passwd",
  "a\x00b",
  "\ufeff",
  "x\ny",
  '"',
  "\ufffd",
  "\u00a0",
)


def cell(plausible) -> st.SearchStrategy[str]:
  return st.one_of(
    st.sampled_from(tuple(plausible) or ("",)),
    st.sampled_from(ODD),
    st.text(max_size=16),
  )


def damage(data: bytes, draw) -> bytes:
  """Byte-level damage, sometimes: bytes that are not UTF-8, a cut, a row cut short."""
  kind = draw(st.integers(0, 7))
  if kind == 0 and data:
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
  if kind == 1 and data:
    return data[: draw(st.integers(0, len(data)))]
  if kind == 2:
    lines = data.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = lines[i].rsplit(b",", 1)[0] if draw(st.booleans()) else lines[i] + b",extra"
    return b"\n".join(lines)
  return data


@st.composite
def csv_file(draw, columns: dict[str, tuple[str, ...]], max_rows: int = 4) -> bytes:
  """A CSV with `columns` (sometimes one dropped, sometimes an extra one) and damaged bytes.

  Each row starts from plausible values and gets up to 3 cells replaced by fuzz (few draws
  per row keep generation cheap, so the example budget goes into the parser).
  """
  names = list(columns)
  if draw(st.integers(0, 11)) == 0:
    names.remove(draw(st.sampled_from(names)))
  if draw(st.integers(0, 5)) == 0:
    names.append(draw(st.text(max_size=6)))
  options = [columns.get(n) or ("",) for n in names]
  rows = []
  for _ in range(draw(st.integers(0, max_rows))):
    pick = draw(st.integers(0, 63))
    row = [values[(pick + j) % len(values)] for j, values in enumerate(options)]
    for _ in range(draw(st.integers(0, 3))):
      j = draw(st.integers(0, len(names) - 1))
      row[j] = draw(cell(columns.get(names[j], ())))
    rows.append(row)
  out = io.StringIO(newline="")
  csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows([names, *rows])
  return damage(out.getvalue().encode("utf-8"), draw)


@st.composite
def text_lines(draw, plausible: tuple[str, ...]) -> bytes:
  lines = draw(st.lists(st.one_of(st.sampled_from(plausible), st.text(max_size=40)), max_size=6))
  return damage("\n".join(lines).encode("utf-8"), draw)


HEADERS = (
  "FINDINGS",
  "IMPRESSION",
  "FINDINGS AND IMPRESSION",
  "CONCLUSION",
  "INDICATION",
  "HISTORY",
  "COMPARISON",
  "TECHNIQUE",
  "WET READ",
  "FINAL REPORT",
  "PA AND LATERAL CHEST RADIOGRAPH",
)
PIECES = (
  "The lungs are clear.",
  "No acute cardiopulmonary process.",
  "Heart size is normal. ",
  "1. Bullous emphysema. 2. Edema.",
  "XXXX",
  "e.g. 1.5 cm",
  ". . .",
  "\n\n",
  "\n",
  " ",
  "\t",
  "\u00a0",
  "\ufffd",
  ":",
)


@st.composite
def reports(draw) -> str:
  parts = []
  for _ in range(draw(st.integers(0, 8))):
    kind = draw(st.integers(0, 3))
    if kind == 0:
      sep = draw(st.sampled_from(("", " ", "\n", "\n\n", "  ")))
      parts.append(
        f"{sep}{draw(st.sampled_from(HEADERS))}:{draw(st.sampled_from(('', ' ', chr(10))))}"
      )
    elif kind == 1:
      parts.append(draw(st.sampled_from(PIECES)))
    else:
      parts.append(draw(st.text(max_size=30)))
  return "".join(parts)


# ----------------------------------------------------------------------------- report text

_DROP = re.compile(r"[\s.\ufffd]+")


def squash(text: str) -> str:
  """Text without whitespace, periods and U+FFFD: what normalising may change."""
  return _DROP.sub("", text)


def is_subsequence(part: str, whole: str) -> bool:
  it = iter(whole)
  return all(c in it for c in part)


def check_sections(report: str) -> None:
  sections = common.parse_sections(report)
  whole = squash(report)
  for name, body in sections.items():
    assert body and body == body.strip()
    assert name == "" or name in report.replace("\n", " ") or re.sub(r"\s+", " ", name) == name
    # Bodies come from the input, in order (a repeated header joins its bodies in order).
    assert is_subsequence(squash(body), whole), (name, body)
  findings, impression, text = common.report_fields(report)
  for piece in (findings, impression, text):
    for word in piece.split():
      assert squash(word) in whole, word
  for s in sentences.split_sentences(report):
    assert s and squash(s) in whole or is_subsequence(squash(s), whole)


@fuzz(reports(), "text")
def test_fuzz_report_sections_never_raise_or_invent_text(report):
  check_sections(report)


@fuzz(reports(), "text", slow=True)
def test_fuzz_report_sections_slow(report):
  check_sections(report)


# ----------------------------------------------------------------------------- Open-i XML


@functools.cache
def _xml_seed() -> bytes:
  from tests import fixtures_layout as fl  # pylint: disable=g-import-not-at-top
  from tests.conftest import sample_dir  # pylint: disable=g-import-not-at-top

  return fl.openi_xml(fl.iu_reports(sample_dir())[0]).encode("utf-8")


@st.composite
def xml_docs(draw) -> bytes:
  kind = draw(st.integers(0, 3))
  if kind == 0:
    return draw(st.binary(max_size=200))
  seed = _xml_seed()
  if kind == 1:  # A well-formed document with odd text and attributes.
    text = draw(st.text(max_size=40)).replace("]]>", "")
    return seed.replace(
      b"Indiana University Chest X-ray Collection", f"<![CDATA[{text}]]>".encode()
    )
  at = draw(st.integers(0, len(seed)))
  return damage(seed[:at] + draw(st.binary(max_size=8)) + seed[at:], draw)


def check_xml(data: bytes) -> None:
  from data_pipelines.openi import openi_dataset_builder as ob  # pylint: disable=g-import-not-at-top

  try:
    sections, major, images = ob.parse_report(data)
  except ob.ReportError as e:
    assert "\n" not in str(e)
    return
  assert all(isinstance(v, str) for v in sections.values())
  assert all(isinstance(m, str) for m in major) and all(isinstance(i, str) for i in images)
  ob.mesh_labels(major)


@fuzz(xml_docs(), "xml")
def test_fuzz_openi_xml_only_report_error(data):
  check_xml(data)


@fuzz(xml_docs(), "xml", slow=True)
def test_fuzz_openi_xml_slow(data):
  check_xml(data)


# ----------------------------------------------------------------------------- builders

CHEX = common.CHEXPERT_LABELS
LABEL_CELLS = ("1.0", "0.0", "-1.0", "", "1", "-1")


class _Manual:
  """The one attribute of tfds's DownloadManager that a builder reads."""

  def __init__(self, manual_dir):
    self.manual_dir = manual_dir


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def builders(scratch):
  from medvl_jax.data import corpora  # pylint: disable=g-import-not-at-top

  out = {}
  for name, config in (
    ("chexpert", "u_ignore_64"),
    ("mimic_cxr", "paired_64"),
    ("nih14", "default_64"),
    ("rsna_pneumonia", "default_64"),
    ("covidx", "default_64"),
    ("openi", "paired_64"),
    ("cxr_sample", "paired"),
  ):
    out[name] = corpora.builder_cls(name)(config=config, data_dir=str(scratch / "tfds"))
  for config in ("text_only", "image_only"):
    out[f"cxr_sample/{config}"] = corpora.builder_cls("cxr_sample")(
      config=config, data_dir=str(scratch / "tfds")
    )
  return out


_WRITTEN: dict[pathlib.Path, set[pathlib.Path]] = {}


def fresh(scratch: pathlib.Path, name: str) -> pathlib.Path:
  """scratch/name with the files of the previous example removed (folders are kept: removing
  them costs more than the parsers under test)."""
  root = scratch / name
  for path in _WRITTEN.pop(root, set()):
    path.unlink(missing_ok=True)
  root.mkdir(exist_ok=True)
  return root


def write(root: pathlib.Path, files: dict[str, bytes]) -> None:
  written = _WRITTEN.setdefault(root, set())
  for rel, data in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.add(path)


def run_builder(b, root: pathlib.Path) -> None:
  """A builder's whole record path on `root`: only a one-line DataError may escape; no kept
  record's image resolves outside root."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  try:
    if isinstance(b, common.CorpusBuilder):
      b._skipped = collections.Counter()  # pylint: disable=protected-access
      b.manifest = common.Manifest(epath.Path(root))
      by_split = b._split_records(epath.Path(root))  # pylint: disable=protected-access
      common.check_records(by_split, epath.Path(root))
      for split, records in by_split.items():
        for r in records:
          assert "_skip" in r or common.inside(epath.Path(root), r["_image"]), r["_image"]
        for _ in b._generate_examples(records, split):  # pylint: disable=protected-access
          pass
    else:
      gens = b._split_generators(_Manual(epath.Path(root)))  # pylint: disable=protected-access
      for gen in gens.values():
        for _ in gen:
          pass
  except DataError as e:
    assert "\n" not in str(e), str(e)


PATH = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"


@st.composite
def chexpert_tree(draw):
  cols = {
    "Path": (PATH, "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "x.jpg"),
    "Frontal/Lateral": ("Frontal", "Lateral"),
    "AP/PA": ("AP", "PA", ""),
    **{c: LABEL_CELLS for c in CHEX},
  }
  return {
    "CheXpert-v1.0-small/train.csv": draw(csv_file(cols)),
    "CheXpert-v1.0-small/valid.csv": draw(csv_file(cols)),
  }


def gz(draw, data: bytes) -> bytes:
  out = gzip.compress(data)
  return damage(out, draw) if draw(st.integers(0, 9)) == 0 else out


@st.composite
def mimic_tree(draw):
  ids = {
    "dicom_id": ("d1", "d2", "../d"),
    "subject_id": ("10000032", "1", "../.."),
    "study_id": ("50414267", "5"),
  }
  files = {
    "mimic-cxr-2.0.0-metadata.csv.gz": gz(
      draw, draw(csv_file({**ids, "ViewPosition": ("PA", "AP", "")}))
    ),
    "mimic-cxr-2.0.0-split.csv.gz": gz(
      draw, draw(csv_file({**ids, "split": ("train", "validate", "test", "x")}))
    ),
    "mimic-cxr-2.0.0-chexpert.csv.gz": gz(
      draw,
      draw(
        csv_file(
          {
            "subject_id": ids["subject_id"],
            "study_id": ids["study_id"],
            **{c: LABEL_CELLS for c in CHEX},
          }
        )
      ),
    ),
  }
  files["files/p10/p10000032/s50414267.txt"] = draw(reports()).encode("utf-8", "surrogatepass")
  return files


@st.composite
def nih_tree(draw):
  names = ("00000001_000.png", "00000002_000.png", "../x.png")
  cols = {
    "Image Index": names,
    "Finding Labels": ("No Finding", "Effusion|Mass", "Bogus", ""),
    "Patient ID": ("1", "2"),
    "View Position": ("PA", "AP", ""),
  }
  return {
    "Data_Entry_2017_v2020.csv": draw(csv_file(cols)),
    "train_val_list.txt": draw(text_lines(names)),
    "test_list.txt": draw(text_lines(names)),
  }


@st.composite
def rsna_tree(draw):
  pids = ("p1", "p2", "../p")
  return {
    "stage_2_train_labels.csv": draw(
      csv_file(
        {
          "patientId": pids,
          "x": ("", "264.0", "nan"),
          "y": ("", "152.0"),
          "width": ("", "213.0"),
          "height": ("", "379.0"),
          "Target": ("0", "1", "2", ""),
        }
      )
    ),
    "stage_2_detailed_class_info.csv": draw(csv_file({"patientId": pids, "class": ("Normal",)})),
    # A file where a DICOM should be: its header read must fail cleanly.
    "stage_2_train_images/p1.dcm": draw(
      st.one_of(st.binary(max_size=300), st.just(b"\0" * 128 + b"DICM"))
    ),
  }


@st.composite
def covidx_tree(draw):
  line = st.one_of(
    st.sampled_from(
      (
        "p1 a.png normal",
        "p2 b c.png COVID-19 src",
        "p3 ../../x.png pneumonia",
        "p4 d.png positive",
      )
    ),
    st.text(max_size=30),
  )
  lines = lambda: "\n".join(draw(st.lists(line, max_size=5))).encode("utf-8")  # noqa: E731
  return {
    "train_COVIDx9A.txt": damage(lines(), draw),
    "test_COVIDx9A.txt": damage(lines(), draw),
    "train/a.png": b"not a png",
  }


@st.composite
def openi_tree(draw):
  return {
    "ecgen-radiology/1.xml": draw(xml_docs()),
    "NLMCXR_png/.keep": b"",
    "indiana_projections.csv": draw(
      csv_file(
        {
          "uid": ("1",),
          "filename": ("1_IM-0001-4001.dcm.png",),
          "projection": ("Frontal", "Lateral"),
        }
      )
    ),
  }


PNG = None


def _png() -> bytes:
  global PNG
  if PNG is None:
    from tests.conftest import sample_dir  # pylint: disable=g-import-not-at-top

    PNG = (sample_dir() / "nih14_sample" / "images" / "00000075_000.png").read_bytes()
  return PNG


@st.composite
def sample_tree(draw):
  from data_pipelines.cxr_sample import cxr_sample_dataset_builder as sb  # pylint: disable=g-import-not-at-top

  paired = {
    "image_file": ("images/a.png", "images/missing.png", "../../x.png"),
    "patientid": ("1", "2", "3"),
    "clinical_notes": PIECES,
    "finding": ("COVID-19",),
    "view": ("PA", ""),
  }
  iu = {
    "report_id": ("1", "2"),
    "findings": PIECES,
    "impression": PIECES,
    "is_normal": ("0", "1", "", "x"),
  }
  nih = {
    "image_file": ("images/a.png", "../a.png"),
    "image_index": ("a.png", "b.png"),
    "patient_id": ("1", "2"),
    "view_position": ("PA",),
    **{c: ("0", "1", "2", "") for c in sb.NIH_LABELS},
  }
  return {
    sb.PAIRED_CSV: draw(csv_file(paired)),
    sb.IU_CSV: draw(csv_file(iu)),
    sb.NIH_CSV: draw(csv_file(nih)),
    "covid_cxr_notes/images/a.png": _png()[: draw(st.sampled_from((None, 60)))],
    "nih14_sample/images/a.png": _png(),
  }


BUILDER_TREES = {
  "chexpert": chexpert_tree(),
  "mimic_cxr": mimic_tree(),
  "nih14": nih_tree(),
  "rsna_pneumonia": rsna_tree(),
  "covidx": covidx_tree(),
  "openi": openi_tree(),
  "cxr_sample": sample_tree(),
  "cxr_sample/text_only": sample_tree(),
  "cxr_sample/image_only": sample_tree(),
}


def _builder_test(name: str, strategy, slow: bool):
  @fuzz(strategy, "builder", slow=slow)
  def test(builders, scratch, files):
    root = fresh(scratch, name.replace("/", "_"))
    write(root, files)
    run_builder(builders[name], root)

  test.__name__ = f"test_fuzz_builder_{name.replace('/', '_')}" + ("_slow" if slow else "")
  return test


def _builder_tests(slow: bool):
  for name, strategy in BUILDER_TREES.items():
    test = _builder_test(name, strategy, slow)
    globals()[test.__name__] = test


_builder_tests(slow=False)
_builder_tests(slow=True)


# ----------------------------------------------------------------------------- 8x200 CSVs


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


@st.composite
def retrieval_tree(draw):
  cats = CATEGORIES  # retrieval.CATEGORIES (asserted below); imported lazily there.
  paths = (PATH, "x/../../etc/passwd", "missing.jpg")
  return {
    "image-retrieval/query.csv": draw(csv_file({"Variable": cats + ("Bogus",), "Path": paths})),
    "image-retrieval/candidate.csv": draw(
      csv_file({"Path": paths, **{c: LABEL_CELLS for c in cats}})
    ),
    "text-retrieval/query.csv": draw(csv_file({"Variable": cats, "Text": PIECES})),
  }


@pytest.fixture(scope="module")
def retrieval():
  from medvl_jax.evaluate import retrieval as module  # pylint: disable=g-import-not-at-top

  assert module.CATEGORIES == CATEGORIES
  return module


def check_8x200(retrieval, scratch, files) -> None:
  root = fresh(scratch, "retrieval")
  write(root, files)
  chexpert = root / "chexpert"
  write(root, {f"chexpert/{PATH}": b""})
  try:
    retrieval.read_8x200(root, chexpert)
  except DataError as e:
    assert "\n" not in str(e), str(e)


@fuzz(retrieval_tree(), "csv")
def test_fuzz_8x200_csvs(retrieval, scratch, files):
  check_8x200(retrieval, scratch, files)


@fuzz(retrieval_tree(), "csv", slow=True)
def test_fuzz_8x200_csvs_slow(retrieval, scratch, files):
  check_8x200(retrieval, scratch, files)


def test_8x200_path_cell_with_a_newline_is_named_on_one_line(retrieval, tmp_path):
  # Found by the slow fuzz run: a quoted CSV cell "x<newline>y" named as a missing image put a
  # line break into the error. Every MedvlError escapes line breaks in what it quotes.
  files = {
    "image-retrieval/query.csv": b'Variable,Path\nAtelectasis,"x\ny"\n',
    "image-retrieval/candidate.csv": (
      b"Path," + ",".join(CATEGORIES).encode() + b"\n" + PATH.encode() + b",1" + b",0" * 7 + b"\n"
    ),
    "text-retrieval/query.csv": b"Variable,Text\nAtelectasis,No acute process.\n",
  }
  with pytest.raises(DataError) as e:
    check_files = tmp_path / "tree"
    write(check_files, files)
    write(check_files, {f"chexpert/{PATH}": b""})
    retrieval.read_8x200(check_files, check_files / "chexpert")
  message = str(e.value)
  assert "\n" not in message and "\r" not in message, message
  assert "chexpert/x\\ny" in message, message


# ----------------------------------------------------------------------------- config overrides

KEYS = (
  "batch_size",
  "seed",
  "total_steps",
  "optimizer.lr",
  "loss.temperature",
  "loss.lam",
  "data.name",
  "data.image_size",
  "model",
  "model.text",
  "data",
  "nope",
  "model.nope.deeper",
)
VALUES = ("4", "-1", "0", "1e30", "nan", "inf", "True", "None", "[1", "{}", "(1,2)", "''", "x")


@st.composite
def override_argv(draw) -> list[str]:
  argv = ["main", "--config=configs/convirt.py:smoke"]
  for _ in range(draw(st.integers(1, 3))):
    key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)))
    value = draw(st.one_of(st.sampled_from(VALUES), st.text(max_size=12)))
    argv.append(f"--config.{key}={value}")
  if draw(st.integers(0, 9)) == 0:
    argv[1] = draw(
      st.sampled_from(("--config=configs/convirt.py:nope", "--config=nope.py", "--config="))
    )
  return argv


_MAIN_FLAGS = ("config", "workdir")  # The global flags medvl_jax.main defines on import.


@pytest.fixture(scope="module")
def main_cli():
  """medvl_jax.main, imported with its global flags: a same-named flag that another module
  (data_pipelines.prepare's --config) defined in this test process is set aside meanwhile."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = flags.FLAGS
  mine = "medvl_jax.main" not in sys.modules
  saved = {n: fv[n] for n in _MAIN_FLAGS if n in fv} if mine else {}
  for name in saved:
    delattr(fv, name)
  import medvl_jax.main as main  # pylint: disable=g-import-not-at-top

  yield main
  if mine:
    for name in _MAIN_FLAGS:
      if name in fv:
        delattr(fv, name)
    del sys.modules["medvl_jax.main"]
    for name, flag in saved.items():
      fv[name] = flag


def check_flags(main, argv: list[str]) -> None:
  err = io.StringIO()
  old_argv = sys.argv
  sys.argv = argv  # ml_collections reads the overrides from sys.argv, as in the real CLI.
  try:
    with contextlib.redirect_stderr(err):
      cli.parse_flags(argv)
  except SystemExit as e:
    assert e.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
  finally:
    sys.argv = old_argv
    main.FLAGS.unparse_flags()
    for name in [n for n in main.FLAGS if n.startswith("config.")]:
      delattr(main.FLAGS, name)  # Override flags are defined per parse.


@fuzz(override_argv(), "flags")
def test_fuzz_config_overrides_one_line_exit_2(main_cli, argv):
  check_flags(main_cli, argv)


@fuzz(override_argv(), "flags", slow=True)
def test_fuzz_config_overrides_slow(main_cli, argv):
  check_flags(main_cli, argv)
