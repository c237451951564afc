"""What every command-line tool here shares: mistakes end as one `error: ...` line, exit 2."""

import sys
from typing import NoReturn

from absl import flags


def die(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def last_line(e: BaseException) -> str:
  """Some libraries (ml_collections) embed tracebacks in messages; the last line says what."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`: one line on a bad flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    die(last_line(e))
