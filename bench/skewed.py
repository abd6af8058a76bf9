"""Generated event logs with the skew of real ones, for benchmarks on shapes no public set here has.

A latent taste model: items and users belong to soft clusters in a 16-d space; item popularity
follows a power law (Zipf exponent ``pop_alpha``), user activity a log-normal; each user draws
their items without replacement from softmax(taste * u.v / 4 + log popularity) (Gumbel top-k).
The result has a long tail of rarely seen items, a few heavy users and many light ones: what
play-count, purchase and rating logs look like, and what makes popularity a strong baseline.

Shapes (``SHAPES``): ``wide`` (1,900 users x 17,600 items, ~50 items a user: the shape of a
music play-count log), ``small`` (610 users x 9,700 items, ~80 a user: a small movie-rating log),
``tall`` (20,000 users x 3,000 items, ~40 a user).

    python bench/skewed.py wide /tmp/wide.csv     # user_id,item_id,timestamp
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

SHAPES = {
    "wide": {"n_users": 1900, "n_items": 17600, "mean_items": 50, "seed": 1},
    "small": {"n_users": 610, "n_items": 9700, "mean_items": 80, "seed": 2},
    "tall": {"n_users": 20000, "n_items": 3000, "mean_items": 40, "seed": 3},
}


def generate(n_users: int, n_items: int, mean_items: float, seed: int = 0, dim: int = 16, clusters: int = 20,
             pop_alpha: float = 1.1, taste: float = 2.0) -> pd.DataFrame:
    """A log of distinct (user, item) pairs with epoch-second timestamps; see the module docstring."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    items = centres[rng.integers(clusters, size=n_items)] + 0.7 * rng.normal(size=(n_items, dim))
    users = centres[rng.integers(clusters, size=n_users)] + 0.7 * rng.normal(size=(n_users, dim))
    popularity = 1.0 / np.arange(1, n_items + 1) ** pop_alpha
    log_pop = np.log(popularity[rng.permutation(n_items)] / popularity.sum())
    activity = np.round(rng.lognormal(np.log(mean_items) - 0.5, 1.0, n_users)).astype(np.int64)
    activity = np.clip(activity, 3, n_items // 2)
    user_col, item_col = [], []
    for start in range(0, n_users, 256):
        rows = np.arange(start, min(n_users, start + 256))
        logits = taste * (users[rows] @ items.T) / np.sqrt(dim) + log_pop
        keys = logits - np.log(-np.log(rng.random(logits.shape)))  # Gumbel top-k: draws without replacement
        for j, u in enumerate(rows):
            k = activity[u]
            user_col.append(np.full(k, u))
            item_col.append(np.argpartition(-keys[j], k)[:k])
    users_out, items_out = np.concatenate(user_col), np.concatenate(item_col)
    times = 1_600_000_000 + rng.integers(0, 365 * 86400, size=len(users_out))
    return pd.DataFrame({"user_id": [f"u{u}" for u in users_out], "item_id": [f"i{i}" for i in items_out],
                         "timestamp": times})


def write(shape: str, path: str | Path) -> Path:
    """Generate ``SHAPES[shape]`` into the CSV file ``path`` (cached: an existing file is kept)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generate(**SHAPES[shape]).to_csv(path, index=False)
    return path


if __name__ == "__main__":
    print(write(sys.argv[1], sys.argv[2]))
