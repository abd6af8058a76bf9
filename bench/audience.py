"""Lookalike audiences on MovieLens 100K: recovering a hidden part of a known audience.

The embedding model is trained once by the real pipeline (``python train.py data=movielens``, the
propensity step off; the audience step builds profiles and segments), the bundle is loaded with
``Recommender.load``, and for each audience and split seed:

1. half of the audience (``--hide``) is hidden, the rest is the seed list;
2. the seeds are expanded to as many users as were hidden (and 3x as many) by ``centroid``,
   ``contrast`` and ``neighbours`` lookalike, by ``popularity`` (the most active users: most distinct movies rated)
   and by ``random`` (the expectation: |hidden| / |candidates|);
3. precision (hidden members found / users returned) and recall (/ hidden) are reported, mean over
   seeds.

Audiences, defined from the cleaned ratings (all ratings, so a "fan" is someone who watches the
genre, whatever they thought of it):
* ``horror >= 1``: rated at least one Horror movie (most users: an easy baseline to beat?);
* ``horror fans``: at least 10 % of their ratings are of Horror movies;
* ``children's fans``: at least 20 % of their ratings are of Children's movies;
* ``film-noir >= 5``: rated at least five Film-Noir movies.

    python bench/audience.py                       # 3 split seeds, 10 epochs
    python bench/audience.py --seeds 1 -- trainer.max_epochs=3

Arguments after ``--`` are Hydra overrides of the training run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import output  # noqa: E402
from common import ML100K, Timer, compose_train_cfg, markdown_table, write_section  # noqa: E402

from dmp_dl import Recommender  # noqa: E402
from dmp_dl.audience.lookalike import holdout_quality  # noqa: E402
from dmp_dl.pipeline.run import run  # noqa: E402

METHODS = ("centroid", "contrast", "neighbours", "popularity", "random")


def audiences(dm, rec: Recommender) -> dict[str, np.ndarray]:
    """Audience name -> bundle user rows, from the cleaned ratings and the movies' genres."""
    ev = dm.events
    genres = dm.log_.items.set_index("item_id")["genres"].astype(str)
    movie_genres = genres.reindex(dm.item_vocab.ids[ev["item_idx"].to_numpy()]).fillna("").to_numpy()
    users = ev["user_idx"].to_numpy()

    def per_user(genre: str) -> pd.DataFrame:
        has = pd.Series(pd.Series(movie_genres).str.split("|").map(lambda g: genre in g).to_numpy(), index=users)
        return has.groupby(level=0).agg(["sum", "mean"])

    horror, children, noir = per_user("Horror"), per_user("Children's"), per_user("Film-Noir")
    ids = {
        "horror >= 1": horror.index[horror["sum"] >= 1],
        "horror fans (>= 10 % of ratings)": horror.index[horror["mean"] >= 0.10],
        "children's fans (>= 20 % of ratings)": children.index[children["mean"] >= 0.20],
        "film-noir >= 5": noir.index[noir["sum"] >= 5],
    }
    # rows of the DataModule's vocabulary are the bundle's (same vocabulary, exported as is)
    assert (dm.user_vocab.ids == rec.user_vocab.ids).all()
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in ids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="split seeds per audience")
    parser.add_argument("--hide", type=float, default=0.5, help="share of each audience hidden")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training run (after --)")
    output.add_arguments(parser)
    args = parser.parse_args()
    output.use(args)
    if not (ML100K / "u.data").exists():
        print(f"MovieLens 100K not found at {ML100K} (set DMP_ML100K)")
        return
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train_cfg(["data=movielens", f"data.path={ML100K}", "propensity.enabled=false",
                                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                                 "logger=none", "evaluation.report=null", *args.overrides], tmp)
        with Timer() as train_time:
            result = run(cfg)
        rec = Recommender.load(result["bundle_dir"])
        groups = audiences(result["datamodule"], rec)
        rows, raw = [], []
        t0 = time.perf_counter()
        for name, members in groups.items():
            per_seed = [holdout_quality(rec, members, args.hide, seed=s) for s in range(args.seeds)]
            raw.append({"audience": name, "members": int(len(members)), "runs": per_seed})
            for size_pos in range(2):  # 1x and 3x the hidden count
                row = {"audience": name, "members": len(members), "share of users": len(members) / rec.n_users}
                for method in METHODS:
                    picked = [[r for r in run_rows if r["method"] == method][size_pos] for run_rows in per_seed]
                    row["returned"] = picked[0]["size"]
                    row[f"{method} P"] = float(np.mean([r["precision"] for r in picked]))
                    row[f"{method} R"] = float(np.mean([r["recall"] for r in picked]))
                rows.append(row)
        eval_seconds = time.perf_counter() - t0
        ranking = result["metrics"]["ranking"]
        model_name = cfg.model.get("name", "model")
        k = result["metrics"]["audience"].get("k")

    columns = ["audience", "members", "share of users", "returned", *[f"{m} {x}" for m in METHODS for x in "PR"]]
    body = (
        f"MovieLens 100K, all ratings ({rec.n_users} users), `{model_name}` embeddings trained by the pipeline "
        f"({train_time.seconds:.0f} s including {k} k-means segments; test recall@20 "
        f"{ranking[model_name]['recall@20']:.3f}). {args.hide:.0%} of each audience hidden, the rest used as "
        f"seeds; each method returns as many users as were hidden (first row of an audience) or 3x as many "
        f"(second row). P = precision (hidden members among the users returned), R = recall (of the hidden "
        f"members); mean over {args.seeds} split seed(s). `random` is the expectation; `popularity` returns the "
        f"users who rated the most movies. Lookalike evaluation: {eval_seconds:.1f} s for all audiences and seeds.\n\n"
        + markdown_table(rows, columns, floatfmt=".3f")
    )
    write_section("audience", "Lookalike audiences (ML-100k)", body,
                  {"rows": rows, "raw": raw, "train_seconds": train_time.seconds, "segments": k,
                   "ranking": ranking.get(model_name), "hide": args.hide, "seeds": args.seeds})


if __name__ == "__main__":
    main()
