"""Finds report text and patient ids of the sample data in logs and TensorBoard files.

What counts as a leak (used by tests/end_to_end/test_log_privacy.py and
tests/end_to_end/test_faults.py):
  * a sentence of a note, at least MIN_CHARS characters long after normalisation (lower case,
    repr's escaped line breaks and every run of characters other than letters and digits turned
    into one space, so escaping, quoting or re-wrapping in a log line does not hide it).
    Sentences are those of the project's splitter (what the model sees) and of a plain split
    at . ! ? ; and line breaks, over `clinical_notes` and `other_notes` of
    covid_cxr_notes/pairs.csv (the paired sample);
  * a patient id of pairs.csv in an identifying context: after "patient id" / "patientid" /
    "patient_id" (any punctuation between), or as a whole quoted string ('361a', "97") as in
    a logged record or dict. Bare numbers are not searched: the ids are 1-3 digit numbers
    (plus 9 like "361a") that step counts and timings contain by chance.
"""

import csv
import functools
import pathlib
import re
import struct

MIN_CHARS = 20
NOTE_COLUMNS = ("clinical_notes", "other_notes")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_PLAIN_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


_ESCAPES = re.compile(r"\\[nrt]")  # a line break or tab escaped by repr() in a log line


def normalize(text: str) -> str:
  return _NON_ALNUM.sub(" ", _ESCAPES.sub(" ", text).lower()).strip()


@functools.lru_cache(maxsize=4)
def sample_secrets(sample_dir: pathlib.Path) -> tuple[frozenset[str], frozenset[str]]:
  """(normalised sentences of at least MIN_CHARS characters, patient ids) of the paired sample."""
  from data_pipelines import sentences as sentences_lib

  sentences, ids = set(), set()
  with open(sample_dir / "covid_cxr_notes" / "pairs.csv", newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      ids.add(row["patientid"].strip())
      for col in NOTE_COLUMNS:
        text = row.get(col) or ""
        for s in [*sentences_lib.split_sentences(text), *_PLAIN_SPLIT.split(text), text]:
          n = normalize(s)
          if len(n) >= MIN_CHARS:
            sentences.add(n)
  ids.discard("")
  return frozenset(sentences), frozenset(ids)


def find_leaks(text: str, sentences, ids) -> list[str]:
  """The sentences and ids of the sample that `text` contains (see the module docstring)."""
  norm = f" {normalize(text)} "
  found = [f"sentence: {s[:60]!r}" for s in sentences if f" {s} " in norm]
  if ids:
    alt = "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
    context = re.compile(rf"patient\W*_?\W*id\W{{0,6}}({alt})(?![0-9a-z])", re.I)
    quoted = re.compile(rf"""(['"])({alt})\1""")
    found += [f"patient id in context: {m.group(0)!r}" for m in context.finditer(text)]
    found += [f"quoted patient id: {m.group(0)!r}" for m in quoted.finditer(text)]
  return found


def _records(path: pathlib.Path):
  """The records of a TFRecord file (length, its CRC, data, its CRC; CRCs not checked)."""
  data = path.read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    yield data[pos + 12 : pos + 12 + n]
    pos += 12 + n + 4


def tensorboard_texts(logdir: pathlib.Path) -> list[str]:
  """Everything textual in the event files under `logdir`: each file's raw bytes (decoded
  leniently) and, parsed, every tag, string tensor (text summaries) and plugin payload
  (hparams). Parsed with TensorBoard's own protos, without importing TensorFlow."""
  from tensorboard.compat.proto import event_pb2

  def dec(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")

  out = []
  for f in sorted(logdir.rglob("events.out.tfevents.*")):
    out.append(dec(f.read_bytes()))
    for rec in _records(f):
      event = event_pb2.Event.FromString(rec)
      for v in event.summary.value:
        out += [v.tag, dec(v.metadata.plugin_data.content), *map(dec, v.tensor.string_val)]
  return out


def workdir_texts(workdir: pathlib.Path) -> dict[str, str]:
  """Every file of a run directory outside `checkpoints/` (config, metrics, TensorBoard)."""
  out = {}
  for f in sorted(workdir.rglob("*")):
    if f.is_file() and "checkpoints" not in f.relative_to(workdir).parts:
      out[str(f)] = f.read_bytes().decode("utf-8", errors="replace")
  return out


def check_run(workdir: pathlib.Path, logs: dict[str, str], sample_dir: pathlib.Path) -> list[str]:
  """Leaks in the given logs (name -> text), the run's TensorBoard files and its other files."""
  sentences, ids = sample_secrets(sample_dir)
  texts = dict(logs)
  texts.update(workdir_texts(workdir))
  for i, t in enumerate(tensorboard_texts(workdir / "tensorboard")):
    texts[f"tensorboard[{i}]"] = t
  return [f"{name}: {leak}" for name, t in texts.items() for leak in find_leaks(t, sentences, ids)]
