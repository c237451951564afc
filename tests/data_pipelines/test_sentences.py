"""Sentence splitting on crafted cases and on the real sample notes and reports."""

import csv
import re

import pytest

from data_pipelines.sentences import normalize, split_sentences


def _rows(path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def notes(sample_data_dir) -> dict[str, str]:
  rows = _rows(sample_data_dir / "covid_cxr_notes" / "pairs.csv")
  return {r["image_file"]: r["clinical_notes"] for r in rows}


@pytest.fixture(scope="module")
def reports(sample_data_dir) -> dict[str, dict[str, str]]:
  rows = _rows(sample_data_dir / "iu_reports" / "iu_reports_2000.csv")
  return {r["report_id"]: r for r in rows}


@pytest.mark.parametrize(
  "text, expected",
  [
    ("A 1.5 cm nodule. No effusion.", ["A 1.5 cm nodule.", "No effusion."]),
    (
      "Seen by Dr. Smith on arrival. Compare e.g. the 2019 study. Stable.",
      ["Seen by Dr. Smith on arrival.", "Compare e.g. the 2019 study.", "Stable."],
    ),
    ("Findings: 1. Effusion. 2. Edema.", ["Findings: 1. Effusion.", "2. Edema."]),
    ("Left apex.There is scarring.", ["Left apex.", "There is scarring."]),
    ("Clear lungs. . . . X", ["Clear lungs."]),
    ("  Fever?\n\nCough!  no distress. ", ["Fever?", "Cough! no distress."]),
    ("Range 13 IU/L ? 39 IU/L. Done.", ["Range 13 IU/L ? 39 IU/L.", "Done."]),
    ("Grade 2. The rest is normal.", ["Grade 2.", "The rest is normal."]),
    ("", []),
  ],
)
def test_crafted(text, expected):
  assert split_sentences(text) == expected


def test_normalize_whitespace_and_replacement_marks():
  assert normalize("Presentation:\ufffdCough\u00a0 and\tfever..") == (
    "Presentation: Cough and fever."
  )
  assert normalize("Effusions. . Stable...") == "Effusions. Stable."


def test_iu_enumerated_impression_and_xxxx_marks(reports):
  report = reports["4"]
  assert split_sentences(report["findings"])[1] == (
    "There are irregular opacities in the left lung apex, that could represent a cavitary "
    "lesion in the left lung apex."
  )
  assert split_sentences(report["findings"])[2] == (
    "There are streaky opacities in the right upper lobe, XXXX scarring."
  )
  impression = split_sentences(report["impression"])
  assert [s[:3] for s in impression] == ["1. ", "2. ", "3. "]
  assert split_sentences(reports["2"]["findings"]) == [
    "Borderline cardiomegaly.",
    "Midline sternotomy XXXX.",
    "Enlarged pulmonary arteries.",
    "Clear lungs.",
    "Inferior XXXX XXXX XXXX.",
  ]


def test_real_notes_keep_decimals_and_abbreviations(notes):
  note = notes["images/16654_1_1.png"]
  sentences = split_sentences(note)
  lab = [s for s in sentences if s.startswith("Laboratory studies")]
  assert len(lab) == 1 and lab[0].endswith("(2.37 ng/mL, normal < 0.1 ng/mL).")
  assert any("(Fig. 1)" in s for s in sentences)
  radiopaedia = split_sentences(notes["images/582f068ae16494e015cf2b2ed90388_jumbo-1.png"])
  assert "Bibasal atelectasis." in radiopaedia
  assert "ranging from 0.7 cm to 2 cm." in " ".join(radiopaedia)


def _alnum(text: str) -> str:
  return re.sub(r"[^0-9A-Za-z]", "", text)


def test_all_real_texts_lose_nothing_and_give_clean_sentences(notes, reports):
  texts = list(notes.values())
  texts += [r[k] for r in reports.values() for k in ("findings", "impression")]
  counts = []
  for text in texts:
    sentences = split_sentences(text)
    counts.append(len(sentences))
    for s in sentences:
      assert s == s.strip() and len(s) > 1 and "  " not in s
      assert not re.fullmatch(r"\(?\w{1,2}\)?\.", s), s  # No orphan enumeration marker.
    # Every letter and digit survives, in order (only punctuation-only bits are dropped).
    assert _alnum(normalize(text)) == _alnum("".join(sentences)), text
  per_report = sum(counts[len(notes) :]) / len(reports)
  assert 5.0 < per_report < 7.0  # Like MIMIC's ~6 sentences per report (ConVIRT paper).
  assert all(c > 0 for c in counts[: len(notes)])
