"""Rule-based sentence splitting for radiology reports and clinical notes.

Used by the tfds builders to store each report as a list of sentences, from which ConVIRT
samples one per view. The rules are conservative: a period ends a sentence only if the next
sentence visibly starts (upper-case letter, digit, bracket or quote), and never inside a
decimal ("1.5 cm"), after a common abbreviation ("Dr.", "e.g.", "approx.") or after an
enumeration marker at the start of a sentence ("1. Bullous emphysema."). De-identification
marks such as the IU "XXXX" are kept as they are.
"""

import re

# Abbreviations (lower case, without the final period) after which a period does not end a
# sentence. Kept short and medical/clinical; "etc." is left out because it usually ends one.
ABBREVIATIONS = frozenset(
  {
    "dr",
    "drs",
    "mr",
    "mrs",
    "ms",
    "prof",
    "st",
    "vs",
    "e.g",
    "i.e",
    "cf",
    "approx",
    "appr",
    "fig",
    "figs",
    "ref",
    "refs",
    "resp",
    "al",
    "jr",
    "sr",
    "inc",
    "a.m",
    "p.m",
    "u.s",
    "b.i.d",
    "t.i.d",
    "q.i.d",
    "q.d",
    "p.o",
    "pt",
    "pts",
    "hx",
    "dx",
    "sx",
    "incl",
    "max",
    "min",
    "no",
    "nos",
    "vol",
    "yr",
    "yrs",
    "wk",
    "wks",
    "mo",
    "mos",
    "esp",
    "ca",
    "c.f",
  }
)

# A sentence end: terminal punctuation (plus closing quotes/brackets), then whitespace and
# something that starts a sentence, or the end of the text.
_END = re.compile(r"""[.!?]+["')\]]*(?=\s+["'(\[]?[A-Z0-9]|\s*$)""")
# A period glued to the next sentence ("apex.There"): a lower-case word or an XXXX mark
# before, a capitalised word after.
_GLUED = re.compile(r"(?:(?<=[a-z]{2})|(?<=XXXX))\.(?=[A-Z][a-z])")
# The word (with inner periods, e.g. "e.g") right before a period.
_LAST_WORD = re.compile(r"([A-Za-z][A-Za-z.]*|\d+)$")
# An enumeration marker that opens a sentence: "1", "12", "a", "iv", optionally in brackets.
_ENUM = re.compile(r"^\(?(\d{1,2}|[a-zA-Z]|[ivxIVX]{1,4})\)?$")
# Runs of periods, possibly spaced (". ." in Radiopaedia notes, "..", "...").
_PERIOD_RUN = re.compile(r"\.(?:\s*\.)+")
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
  """Collapses whitespace (incl. NBSP and U+FFFD replacement marks) and runs of periods."""
  text = text.replace("\ufffd", " ").replace("\u00a0", " ")
  text = _PERIOD_RUN.sub(".", text)
  return _WHITESPACE.sub(" ", text).strip()


def _is_boundary(text: str, start: int, punct_start: int, punct_end: int) -> bool:
  """Whether text[punct_start:punct_end] ends the sentence begun at `start`."""
  if text[punct_start] in "!?":
    # A "?" between spaces or before a number is a mis-encoded symbol ("13 ? 39 IU/L").
    spaced = punct_start == 0 or text[punct_start - 1].isspace()
    return not spaced and not text[punct_end:].lstrip()[:1].isdigit()
  before = text[start:punct_start].rstrip()
  match = _LAST_WORD.search(before)
  if not match:
    return True
  word = match.group(1)
  if word.lower() in ABBREVIATIONS:
    return False
  # "1. Bullous emphysema." / "Impression: 2. Edema.": a marker opening a sentence or list.
  lead = before[: match.start()].rstrip()
  opens_list = not lead or lead.endswith((":", ";"))
  return not (opens_list and _ENUM.match(word))


def _split_block(text: str) -> list[str]:
  text = _GLUED.sub(". ", text)
  pieces = []
  start = 0
  for match in _END.finditer(text):
    if _is_boundary(text, start, match.start(), match.end()):
      pieces.append(text[start : match.end()])
      start = match.end()
  pieces.append(text[start:])
  return pieces


def split_sentences(text: str) -> list[str]:
  """Splits a report or note into stripped sentences.

  Blank lines always separate sentences; single line breaks are treated as spaces.
  Fragments that are empty, one character long or without any letter or digit are dropped.

  Args:
    text: the raw report text.

  Returns:
    The sentences, in order.
  """
  sentences = []
  for block in re.split(r"\n\s*\n", text or ""):
    block = normalize(block)
    if not block:
      continue
    for piece in _split_block(block):
      piece = piece.strip()
      if len(piece) > 1 and any(c.isalnum() for c in piece):
        sentences.append(piece)
  return sentences
