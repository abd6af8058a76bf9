"""Per-row aggregates of a long array of entries (events), computed a block of rows at a time.

Aggregates such as a user's event count, last time or distinct days read only that user's
entries, so they can be computed over consecutive ranges of rows, each with temporaries the size
of its entries rather than of the whole array (masked copies, per-type masks, decay weights: about
100 bytes an event over a log of 50M events).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_ENTRIES = 1 << 22  # entries a block of rows holds, about


def blocks_of_rows(rows: np.ndarray, n_rows: int, per_block: int = BLOCK_ENTRIES) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split the entries of ``rows`` (n,) (a row in ``0..n_rows-1`` each; negative: in none) by
    consecutive ranges of rows holding about ``per_block`` entries each, so that per-row
    aggregates can be computed a range at a time with temporaries the size of a block.

    Yields ``(lo, hi, at)``: the rows ``lo..hi-1`` and the positions (ascending, so in the entries'
    own order) of their entries. Rows are split evenly by count, not by entries, so a block holds
    about ``per_block`` entries when the entries spread over the rows.
    """
    kept = int(np.count_nonzero(rows >= 0))
    blocks = max(1, -(-kept // max(int(per_block), 1)))
    bounds = np.linspace(0, n_rows, blocks + 1).astype(np.int64)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield lo, hi, np.flatnonzero((rows >= lo) & (rows < hi)) if blocks > 1 else np.flatnonzero(rows >= 0)
