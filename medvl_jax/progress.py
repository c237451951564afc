"""Progress bars (tqdm: rate and ETA on stderr) for long evaluation passes and exports.

A bar is shown only when the work is large (`total >= min_total`), so small runs (the bundled
sample, tests) print nothing. Descriptions name the work ('image features', 'export'), never
data: no report text or patient identifiers. `TQDM_DISABLE=1` in the environment silences all
bars (tqdm reads `TQDM_*` variables as defaults).
"""

from collections.abc import Iterable
from typing import TypeVar

import tqdm

T = TypeVar("T")

# Evaluation passes over fewer images than this stay quiet (the bundled sample has 297).
MIN_IMAGES = 500
# Exports of fewer tensor bytes than this stay quiet (the smoke model is ~5 MB; full-size
# ConVIRT ~0.5 GB).
MIN_EXPORT_BYTES = 100 * 2**20


def bar(total: int, desc: str, unit: str = "img", min_total: int = MIN_IMAGES, **kw):
  """A tqdm bar for `total` units of work; disabled (a no-op) when total < min_total."""
  return tqdm.tqdm(
    total=total, desc=desc, unit=unit, disable=total < min_total, dynamic_ncols=True, **kw
  )


def iterate(
  items: Iterable[T], total: int, desc: str, unit: str = "img", min_total: int = MIN_IMAGES
) -> Iterable[T]:
  """`items`, advancing a bar by one per item when total >= min_total."""
  with bar(total, desc, unit, min_total) as b:
    for item in items:
      yield item
      b.update(1)
