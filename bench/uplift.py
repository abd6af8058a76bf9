"""Uplift targeting against propensity targeting on a synthetic log with planted campaign responses.

The log (``data.source.campaign_response=true``) plants *sure things* (the heaviest buyers: convert
whether contacted or not), *persuadables* (active users of two segments: 3 % -> 25 % when
contacted) and *lost causes* (1 % either way). The embedding and propensity models are trained once
by the real pipeline; then, for each campaign seed, the loop of the README runs with the same job
functions the command line calls:

1. a broad test campaign: ``task=target`` with every user worth contacting and ``control_frac=0.5``;
   its outcome log is drawn from the planted probabilities (``campaign_outcomes``);
2. ``task=measure`` on it (is the planted lift inside the interval?);
3. ``task=uplift``: the uplift model, with its Qini coefficient on held-out campaign users against
   the propensity ranking, a two-model logistic regression and random order;
4. the next campaign at a fixed budget, ranked by ``score=uplift``, by ``score=propensity``, at
   random, and by the true uplift (the best possible): its expected incremental conversions and
   incremental profit (value x incremental conversions − cost) from the planted probabilities.

    python bench/uplift.py                          # 10,000 users, 3 campaign seeds
    python bench/uplift.py --users 3000 --events 90000 --seeds 1 --scratch -- trainer.max_epochs=2   # quick, into bench/out/

Arguments after ``--`` are Hydra overrides of the training run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import output  # noqa: E402
from common import Timer, compose_train_cfg, markdown_table  # noqa: E402

from dmp_dl import Recommender  # noqa: E402
from dmp_dl.audience import jobs  # noqa: E402
from dmp_dl.campaign.jobs import CampaignFiles, measure_job, uplift_job  # noqa: E402
from dmp_dl.campaign.uplift import UpliftOptions  # noqa: E402
from dmp_dl.data.synthetic import SyntheticSource, campaign_outcomes  # noqa: E402
from dmp_dl.pipeline.run import run  # noqa: E402

RANKINGS = ("uplift_model", "two_model_logistic", "propensity", "random")


def next_campaign(rec: Recommender, true_uplift: np.ndarray, contacts: int, cost: float, value: float,
                  seed: int) -> tuple[dict, dict]:
    """Expected incremental conversions and profit of the users each ranking contacts within the
    budget of ``contacts`` contacts, and those users (rows)."""
    budget = contacts * cost
    out = {}
    for name in ("uplift", "propensity"):
        table, _, _ = jobs.target_job(rec, budget, cost, value, score=name)
        out[name] = rec.user_rows(table["user_id"].tolist())
    rng = np.random.default_rng(seed)
    out["random"] = rng.permutation(rec.n_users)[:contacts]
    out["true uplift (best possible)"] = np.argsort(-true_uplift, kind="stable")[:contacts]
    result = {}
    for name, rows in out.items():
        inc = float(true_uplift[rows].sum())
        result[name] = {"contacts": int(len(rows)), "incremental_conversions": inc,
                        "incremental_profit": inc * value - cost * len(rows)}
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--seeds", type=int, default=3, help="campaign seeds (holdout draw, outcomes, uplift split)")
    parser.add_argument("--contacts", type=float, default=0.1, help="next campaign's contacts, as a share of users")
    parser.add_argument("--cost", type=float, default=1.0)
    parser.add_argument("--value", type=float, default=20.0)
    parser.add_argument("--scratch", action="store_true", help="write into the git-ignored bench/out/, not RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training run (after --)")
    output.add_arguments(parser)
    args = parser.parse_args()
    output.use(args)
    logging.basicConfig(level=logging.WARNING)
    source = dict(n_users=args.users, n_items=1000, n_events=args.events, seed=42, campaign_response=True)
    truth = SyntheticSource(**source).load()
    work = Path(tempfile.mkdtemp(prefix="bench-uplift-"))
    try:
        overrides = [f"data.source.{k}={v}" for k, v in source.items() if k != "seed"] + [
            "logger=none", "evaluation.report=null", "trainer.enable_progress_bar=false", "trainer.max_epochs=3",
            *args.overrides]
        with Timer() as t_train:
            result = run(compose_train_cfg(overrides, work / "run"))
        bundle = Path(result["bundle_dir"])
        kinds = truth.meta["user_response"]
        rows = []
        for seed in range(args.seeds):
            art = work / f"artifacts-{seed}"
            shutil.copytree(bundle, art)
            rec = Recommender.load(art)
            true_uplift = (truth.meta["p_treated"] - truth.meta["p_control"]).reindex(rec.user_vocab.ids).to_numpy()
            out = work / f"campaign-{seed}"
            out.mkdir()
            table, _, _ = jobs.target_job(rec, 1e12, 0.01, args.value, control_frac=0.5, control_seed=seed)
            jobs.write_table(table, out / "target.csv")
            treated = table.loc[table["group"] == "treatment", "user_id"]
            campaign_outcomes(truth, treated, days=14, seed=seed).to_csv(out / "outcomes.csv", index=False)
            files = CampaignFiles(str(out / "target.csv"), str(out / "outcomes.csv"), window_days=14)
            measured = measure_job(files, out / "measure", artifacts=str(art))
            control = table["group"] == "control"
            planted = (truth.meta["p_treated"].reindex(treated).mean()
                       - truth.meta["p_control"].reindex(table.loc[control, "user_id"]).mean())
            with Timer() as t_uplift:
                up = uplift_job(rec, str(art), files, out / "uplift", UpliftOptions(seed=seed))
            rec = Recommender.load(art)
            nxt, chosen = next_campaign(rec, true_uplift, int(args.contacts * rec.n_users), args.cost, args.value, seed)
            chosen_kinds = {name: kinds.reindex(rec.user_vocab.ids[chosen[name]]).value_counts(normalize=True).to_dict()
                            for name in ("uplift", "propensity")}
            rows.append({"seed": seed, "campaign_users": len(table), "treated": int((~control).sum()),
                         "control": int(control.sum()), "measured_lift": measured["lift"], "ci_low": measured["ci_low"],
                         "ci_high": measured["ci_high"], "planted_lift": float(planted),
                         "qini": {k: up["test"]["qini"][k]["qini"] for k in RANKINGS},
                         "held_out_users": up["users"]["test"], "uplift_train_seconds": t_uplift.seconds,
                         "next": nxt, "selected_kinds": chosen_kinds})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(args, rows, t_train.seconds, result)


def _mean_sd(values) -> str:
    v = np.asarray(list(values), dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def write(args, rows: list[dict], train_seconds: float, result: dict) -> None:
    n = len(rows)
    covered = sum(r["ci_low"] <= r["planted_lift"] <= r["ci_high"] for r in rows)
    qini = [{"ranking": k, "Qini coefficient (held-out campaign users)": _mean_sd(r["qini"][k] for r in rows)} for k in RANKINGS]
    contacts = rows[0]["next"]["uplift"]["contacts"]
    nxt = [{"next campaign ranked by": name,
            "contacts": contacts,
            "incremental conversions": _mean_sd(r["next"][name]["incremental_conversions"] for r in rows),
            "incremental profit": _mean_sd(r["next"][name]["incremental_profit"] for r in rows)}
           for name in rows[0]["next"]]
    kinds = pd.DataFrame([{"ranking": name, **{k: v for k, v in r["selected_kinds"][name].items()}}
                          for r in rows for name in ("uplift", "propensity")]).groupby("ranking").mean().reset_index()
    kind_rows = [{"ranking": rk["ranking"], **{c: f"{rk[c]:.2f}" for c in kinds.columns if c != "ranking"}} for _, rk in kinds.iterrows()]
    measure_rows = [{"seed": r["seed"], "treated": r["treated"], "control": r["control"], "planted lift": f"{r['planted_lift']:.4f}",
                     "measured lift": f"{r['measured_lift']:.4f}", "95 % interval": f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"}
                    for r in rows]
    up = rows[0]["next"]["uplift"]["incremental_conversions"]
    pr = rows[0]["next"]["propensity"]["incremental_conversions"]
    body = f"""
Synthetic log with planted responses (`data.source.campaign_response=true`, {args.users:,} users, {args.events:,}
events; training run {train_seconds:.0f} s, test recall@20 {result['metrics']['ranking'].get('two_tower', {}).get('recall@20', float('nan')):.3f}).
Per campaign seed ({n}): a broad test campaign ({rows[0]['campaign_users']:,} users, half held out) with outcomes
drawn from the planted probabilities, measured, an uplift model trained on it (Qini on
{rows[0]['held_out_users']:,} held-out campaign users), then the next campaign at {contacts:,} contacts
(cost {args.cost:g} per contact, value {args.value:g} per conversion), whose incremental conversions and
profit are computed from the planted probabilities. Mean ± sd over campaign seeds. The machine was
shared with other work (2 cores).

**Measure**: the planted lift was inside the 95 % interval in {covered} of {n} campaigns.

{markdown_table(measure_rows)}

**Held-out Qini coefficients** (extra conversions per user, averaged over targeting depths; random = 0 in
expectation):

{markdown_table(qini)}

**Next campaign at the same budget** (expected incremental conversions and profit; first seed: uplift
{up:.1f} vs propensity {pr:.1f} incremental conversions):

{markdown_table(nxt)}

Who each ranking contacts (share of the contacts by planted type):

{markdown_table(kind_rows)}
"""
    import common  # output.use may have pointed it at bench/out/

    common.write_section("uplift", "Campaigns: measured lift and uplift targeting (synthetic, planted responses)", body,
                  {"rows": rows, "train_seconds": train_seconds, "args": vars(args)})


if __name__ == "__main__":
    main()
