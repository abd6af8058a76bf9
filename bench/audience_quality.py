"""Do profiles, segment labels and similar items mean something? MovieLens with its genres.

For each data set (``--data NAME=DIR``, MovieLens 100K or 1M layout) the default model is trained by
the real pipeline (``python train.py data=movielens data.path=DIR``, propensity off: it plays no part
here) unless ``--bundle NAME=DIR`` gives a trained run, and from its bundle:

* profiles: the half-life used, the share of users whose profile is near zero (total interest below
  0.001 of one fresh event);
* segments: whether any label repeats, and the lift of each segment's first label category
  (the segment's mean share of interest in it / all users' mean share), recomputed here from the stored
  profiles and assignments;
* similar items: for three well-known titles (a horror, a children's and a sci-fi film), the share
  of the 10 most similar items that share a genre with the query, and the mean number of ratings of
  those items (how popularity-led they are); the same for the item vectors' inner product (the
  FAISS index, as similar items were served before) for comparison.

    python bench/audience_quality.py --data ml-100k=../shared/data/ml-100k \\
        --data ml-1m-users-1-2999=../shared/data/ml-1m-users-1-2999 --out bench/out/audience_quality.md

Prints a markdown section; ``--out FILE`` also writes it there. Arguments after ``--`` are Hydra
overrides of the training runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmp_dl import Recommender  # noqa: E402
from dmp_dl.index.ann import search_excluding  # noqa: E402

# a horror, two children's films and a sci-fi film
QUERIES = (r"^Shining, The \(1980\)", r"^Toy Story \(1995\)", r"^Lion King, The \(1994\)",
           r"^Star Wars(?:: Episode IV - A New Hope)? \(1977\)")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
                 "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
K = 10


def movies(path: Path) -> pd.DataFrame:
    """item_id (str), title, genres (set of str) of a MovieLens 100K (``u.item``) or 1M (``movies.dat``) folder."""
    if (path / "u.item").exists():
        t = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1")
        flags = t.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy(bool)
        genres = [{g for g, f in zip(ML100K_GENRES, row) if f} for row in flags]
        return pd.DataFrame({"item_id": t[0].astype(str), "title": t[1], "genres": genres})
    t = pd.read_csv(path / "movies.dat", sep="::", header=None, engine="python", encoding="latin-1")
    return pd.DataFrame({"item_id": t[0].astype(str), "title": t[1], "genres": t[2].str.split("|").map(set)})


def train(name: str, data: Path, out: Path, overrides: list[str]) -> tuple[Path, float]:
    cmd = [sys.executable, "train.py", "data=movielens", f"data.path={data}", f"paths.output_dir={out}",
           "propensity.enabled=false", *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: training on {name} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return out / "artifacts", time.perf_counter() - t0


def segment_check(rec: Recommender) -> dict:
    """Labels, their repeats and each segment's first label category's lift (recomputed)."""
    described = rec.segments()
    prof, seg = rec.profiles, rec.stored_segments
    shares = prof.share_matrix()
    member = pd.Series(seg.assignments)
    per_segment = np.vstack([np.asarray(shares[member.index[member == s]].mean(axis=0)).ravel() for s in range(seg.k)])
    overall = np.asarray(shares.mean(axis=0)).ravel()
    cat = {c: i for i, c in enumerate(prof.categories)}
    lifts = []
    for d in described:
        first = (d.get("label_categories") or [None])[0]
        lifts.append(float(per_segment[d["segment"], cat[first]] / overall[cat[first]]) if first in cat else float("nan"))
    labels = [d["label"] for d in described]
    return {"k": seg.k, "labels": labels, "repeats": len(labels) - len(set(labels)), "lifts": lifts}


def neighbour_check(rec: Recommender, items: pd.DataFrame, counts: pd.Series) -> list[dict]:
    """Per query title: genre matches among the top K similar items, new path and item-vector inner product."""
    genres = items.set_index("item_id")["genres"]
    rows = []
    for pattern in QUERIES:
        hit = items[items["title"].str.contains(pattern, regex=True)]
        if hit.empty or hit["item_id"].iloc[0] not in rec._item_rows:
            continue
        qid = hit["item_id"].iloc[0]
        q = np.array([rec._item_rows[qid]])
        ids_old, _ = search_excluding(rec.item_index, rec.item_vectors, rec.item_vectors[q], K, np.array([0, 1]), q)
        for method, ids in (("similar_items", [i for i, _ in rec.similar_items(qid, K)]),
                            ("item-vector inner product", rec.item_vocab.ids[ids_old[0][ids_old[0] >= 0]].tolist())):
            match = sum(bool(genres.get(i, set()) & genres[qid]) for i in ids)
            rows.append({"query": hit["title"].iloc[0], "genres": "/".join(sorted(genres[qid])), "method": method,
                         "match": match, "n": len(ids), "mean_ratings": float(counts.reindex(ids).fillna(0).mean()),
                         "top3": "; ".join(re.sub(r" \(\d{4}\)$", "", items.set_index("item_id").at[i, "title"]) for i in ids[:3])})
    return rows


def rating_counts(path: Path) -> pd.Series:
    if (path / "u.data").exists():
        r = pd.read_csv(path / "u.data", sep="\t", header=None, usecols=[1])
    else:
        r = pd.read_csv(path / "ratings.dat", sep="::", header=None, engine="python", usecols=[1])
    return r[r.columns[0]].astype(str).value_counts()


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", required=True, help="NAME=DIR of a MovieLens 100K/1M folder")
    ap.add_argument("--bundle", action="append", default=[], help="NAME=DIR of a trained run's artifacts (skips training)")
    ap.add_argument("--out", type=Path, help="also write the markdown section to this file")
    args = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in args.bundle)
    lines = ["## Profiles, segment labels and similar items on MovieLens (bench/audience_quality.py)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.data:
            name, data = spec.split("=", 1)
            data = Path(data).resolve()
            if name in bundles:
                artifacts, seconds = Path(bundles[name]), float("nan")
            else:
                artifacts, seconds = train(name, data, Path(tmp) / name, overrides)
            rec = Recommender.load(artifacts)
            prof = rec.profiles
            near_zero = float(np.mean(prof.interest_total < 1e-3))
            seg = segment_check(rec)
            neighbours = neighbour_check(rec, movies(data), rating_counts(data))
            lines += [f"**{name}** (training {seconds:.0f} s; model: {rec.manifest.get('scoring', {}).get('score', '?')}): "
                      f"half-life {prof.half_life_days:.0f} days ({prof.half_life_rule}); profiles near zero "
                      f"{100 * near_zero:.1f} %; K={seg['k']}, repeated labels: {seg['repeats']}; first label "
                      f"category's lift: min {min(seg['lifts']):.3f}", ""]
            lines += ["| segment | label | lift of first label category |", "| --- | --- | --- |"]
            lines += [f"| {s} | {lab} | {lift:.3f} |" for s, (lab, lift) in enumerate(zip(seg["labels"], seg["lifts"]))]
            lines += ["", f"| query | genres | method | share a genre (of {K}) | mean ratings of the {K} | first three |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['query']} | {r['genres']} | {r['method']} | {r['match']}/{r['n']} | {r['mean_ratings']:.0f} | "
                      f"{r['top3']} |" for r in neighbours]
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
