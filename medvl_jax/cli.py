"""What every command-line tool here shares: mistakes end as one `error: ...` line, exit 2."""

import sys
from typing import NoReturn

from absl import flags

# What str.splitlines() breaks at: shown escaped, so an error stays on one line whatever
# text it quotes (a config value or CSV cell holding a newline or carriage return).
_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(message: str) -> str:
  """`message` with its line breaks escaped (a trailing one dropped)."""
  message = message.rstrip("\n")
  return "".join(repr(c)[1:-1] if c in _BREAKS else c for c in message)


def die(message: str) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
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
