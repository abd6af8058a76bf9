"""MovieLens loaders: ML-100k, ML-1M/10M and ML-20M/25M/latest, detected from the files present.

Events are ratings (``event_type='rating'``, ``value`` = the rating); item attributes are the
genres (multi-valued, ``|``) and the release year; user attributes, where the release has them,
are age, gender and occupation. Nothing is downloaded: point ``data.path`` at an extracted copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.errors import DataError
from dmp_dl.core.io import regular_file_problem
from dmp_dl.data.schema import ITEM, TIME, TYPE, USER, VALUE, EventLog

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _read(path: Path, **kwargs) -> pd.DataFrame:
    problem = regular_file_problem(path)
    if problem:  # e.g. a FIFO or a device, which would block the read
        raise DataError(f"{path}: cannot read MovieLens file (it {problem})")
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read MovieLens file ({exc})") from None


def _require(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: lacks column {missing[0]!r} (found columns: {list(frame.columns)}); "
                        "is this a MovieLens release?")
    return frame


def _year_from_title(titles: pd.Series) -> pd.Series:
    return titles.astype(str).str.extract(_YEAR, expand=False).astype("float64")


@dataclass
class MovieLensSource:
    """``data=movielens data.path=DIR``: reads whichever MovieLens release ``DIR`` holds."""

    path: str | None = None

    def load(self) -> EventLog:
        if not self.path:
            raise DataError("data=movielens needs data.path=DIR (a directory with u.data, ratings.dat or ratings.csv)")
        root = Path(self.path)
        if not root.is_dir():
            raise DataError(f"MovieLens directory not found: {root} (set data.path to the extracted release)")
        if (root / "u.data").exists():
            return self._ml100k(root)
        if (root / "ratings.dat").exists():
            return self._ml1m(root)
        if (root / "ratings.csv").exists():
            return self._ml20m(root)
        raise DataError(
            f"{root}: no MovieLens ratings file found (expected u.data for ML-100k, ratings.dat for ML-1M/10M "
            "or ratings.csv for ML-20M/25M/latest)"
        )

    def _ml100k(self, root: Path) -> EventLog:
        ratings = _read(root / "u.data", sep="\t", header=None, names=[USER, ITEM, VALUE, TIME], dtype=str)
        events = ratings.assign(**{TYPE: "rating"})
        items = users = None
        if (root / "u.item").exists():
            cols = ["movie_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
            raw = _read(root / "u.item", sep="|", header=None, names=cols, encoding="latin-1", dtype=str)
            flags = raw[list(ML100K_GENRES)].to_numpy() == "1"
            genres = ["|".join(g for g, f in zip(ML100K_GENRES, row) if f) for row in flags]
            year = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
            items = pd.DataFrame({ITEM: raw["movie_id"], "genres": genres, "year": year.astype("float64")})
        if (root / "u.user").exists():
            raw = _read(root / "u.user", sep="|", header=None, names=[USER, "age", "gender", "occupation", "zip"], dtype=str)
            users = raw[[USER, "age", "gender", "occupation"]]
        return EventLog(events, users, items, source=f"movielens-100k({root})")

    def _ml1m(self, root: Path) -> EventLog:
        ratings = _read(root / "ratings.dat", sep="::", engine="python", header=None, names=[USER, ITEM, VALUE, TIME], dtype=str)
        events = ratings.assign(**{TYPE: "rating"})
        items = users = None
        if (root / "movies.dat").exists():
            raw = _read(root / "movies.dat", sep="::", engine="python", header=None, names=[ITEM, "title", "genres"], encoding="latin-1", dtype=str)
            items = pd.DataFrame({ITEM: raw[ITEM], "genres": raw["genres"], "year": _year_from_title(raw["title"])})
        if (root / "users.dat").exists():
            raw = _read(root / "users.dat", sep="::", engine="python", header=None, names=[USER, "gender", "age", "occupation", "zip"], dtype=str)
            users = raw[[USER, "age", "gender", "occupation"]]
        return EventLog(events, users, items, source=f"movielens-1m({root})")

    def _ml20m(self, root: Path) -> EventLog:
        ratings = _read(root / "ratings.csv", dtype={"userId": str, "movieId": str, "rating": np.float64, "timestamp": np.int64})
        _require(ratings, root / "ratings.csv", ("userId", "movieId", "rating", "timestamp"))
        events = ratings.rename(columns={"userId": USER, "movieId": ITEM, "rating": VALUE, "timestamp": TIME})
        events[TYPE] = "rating"
        items = None
        if (root / "movies.csv").exists():
            raw = _require(_read(root / "movies.csv", dtype=str), root / "movies.csv", ("movieId", "title", "genres"))
            genres = raw["genres"].replace("(no genres listed)", "")
            items = pd.DataFrame({ITEM: raw["movieId"], "genres": genres, "year": _year_from_title(raw["title"])})
        return EventLog(events, None, items, source=f"movielens({root})")
