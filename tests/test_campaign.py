"""Campaigns: holdout control groups, measured lift, the uplift model, ``score=uplift`` and ``POST /uplift``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir

from dmp_dl import Recommender
from dmp_dl.api.server import create_app
from dmp_dl.audience import jobs
from dmp_dl.campaign.control import draw_control
from dmp_dl.campaign.qini import qini_coefficient, qini_curve
from dmp_dl.campaign.stats import difference_in_means, difference_in_proportions
from dmp_dl.commands.audience import run_task
from dmp_dl.core.errors import BundleError, ConfigError, DataError
from dmp_dl.data.synthetic import SyntheticSource, campaign_outcomes
from dmp_dl.pipeline.run import run
from dmp_dl.store.bundle import Bundle

from .conftest import CONF_DIR, QUIET_TRAINER, TINY_DATA, compose_cfg

REPO = Path(__file__).resolve().parents[1]
# the tiny data of conftest.TINY_DATA, with the planted campaign responses
SOURCE = dict(n_users=400, n_items=150, n_events=12000, n_categories=8, n_segments=4, seed=42, campaign_response=True)


def cli_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("audience_cli", overrides=[*overrides, "num_threads=1"])


@pytest.fixture(scope="module")
def truth():
    """The planted log (responses in ``meta``)."""
    return SyntheticSource(**SOURCE).load()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny trained run with propensity and segments on the planted log: its bundle directory.
    The planted responses are a lasting trait of each user, so the user vectors read undecayed
    rows (``data.recency_half_life_days=null``): decayed to their latest sessions they carry less
    of it (with ``auto`` on this log the uplift model's test Qini fell below the propensity
    ranking's, measured -0.0085 against -0.0067)."""
    out = tmp_path_factory.mktemp("campaign") / "run"
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "logger=none", "evaluation.report=null", "data.recency_half_life_days=null",
                       "data.source.campaign_response=true", "audience.segments.k=4", "~propensity.baselines",
                       "propensity.early_stopping.patience=3"], out)
    return Path(run(cfg)["bundle_dir"])


@pytest.fixture(scope="module")
def learning_campaign(bundle, truth, tmp_path_factory):
    """A broad test campaign (every user worth contacting, half held out) and its outcome log."""
    out = tmp_path_factory.mktemp("learning")
    summary = run_task(cli_cfg("task=target", f"artifacts={bundle}", f"output_dir={out}", "budget=1000", "cost=0.01",
                               "value=20", "control_frac=0.5", "control_seed=3"))
    table = pd.read_csv(out / "target.csv", dtype={"user_id": str})
    events = campaign_outcomes(truth, table.loc[table["group"] == "treatment", "user_id"], days=14, seed=0)
    events.to_csv(out / "outcomes.csv", index=False)
    return {"dir": out, "summary": summary, "table": table, "events": events}


@pytest.fixture(scope="module")
def with_uplift(bundle, learning_campaign, tmp_path_factory) -> dict:
    """A copy of the bundle with an uplift model trained on the learning campaign."""
    art = tmp_path_factory.mktemp("uplift") / "artifacts"
    shutil.copytree(bundle, art)
    d = learning_campaign["dir"]
    summary = run_task(cli_cfg("task=uplift", f"artifacts={art}", f"assignments={d / 'target.csv'}",
                               f"outcomes={d / 'outcomes.csv'}", f"output_dir={art.parent / 'out'}"))
    return {"artifacts": art, "summary": summary, "out": art.parent / "out"}


# -- the synthetic campaign ----------------------------------------------------------------------


def test_default_synthetic_log_is_unchanged_by_the_campaign_option():
    def digest(log):
        return hashlib.sha256("".join(t.to_csv(index=False) for t in (log.events, log.users, log.items)).encode()).hexdigest()

    small = dict(n_users=300, n_items=100, n_events=3000, seed=5)
    plain, planted = SyntheticSource(**small).load(), SyntheticSource(**small, campaign_response=True).load()
    # the digest of this log as generated before campaign responses existed
    assert digest(plain) == "b649b1920147636d41daf93a214d245f18f0736930add0782ee67782a7d1d5d4"
    assert digest(planted) == digest(plain)
    assert "user_response" not in plain.meta
    kinds = planted.meta["user_response"]
    uplift = planted.meta["p_treated"] - planted.meta["p_control"]
    assert set(kinds) == {"sure_thing", "persuadable", "lost_cause"}
    assert (uplift[kinds == "persuadable"] > 0.1).all() and (uplift[kinds != "persuadable"].abs() < 1e-12).all()
    # sure things are the heavy buyers: the largest share of purchases among their events in the log
    ev = planted.events
    share = (ev["event_type"] == "purchase").groupby(ev["user_id"]).mean().reindex(kinds.index)
    per_kind = share.groupby(kinds).mean()
    assert per_kind["sure_thing"] > 2 * per_kind["persuadable"]


# -- control groups ------------------------------------------------------------------------------


def test_control_group_is_stratified_random_and_reproducible():
    rng = np.random.default_rng(0)
    n = 3000
    rows = rng.permutation(10_000)[:n]
    segments = rng.integers(5, size=n)
    scores = rng.beta(1, 5, size=n)
    hold = draw_control(rows, scores, 0.1, seed=7, segments=segments)
    # within one user of the share in every stratum, and overall
    frame = pd.DataFrame({"s": hold.stratum, "c": hold.control})
    sizes = frame.groupby("s")["c"].agg(["size", "sum"])
    assert (np.abs(sizes["sum"] - 0.1 * sizes["size"]) < 1).all() and len(sizes) == 50
    assert abs(hold.control.sum() - 0.1 * n) < 1
    # deciles: equal sizes, 1 = the highest scores
    assert np.bincount(hold.decile)[1:].tolist() == [300] * 10
    assert scores[hold.decile == 1].min() >= scores[hold.decile == 2].max()
    # balanced on the score and per segment
    summary = hold.summary(scores)
    assert abs(summary["balance"]["standardised_mean_difference"]) < 0.05
    assert summary["treatment"] + summary["control"] == n and summary["seed"] == 7
    assert summary["strata"]["count"] == 50 and summary["strata"]["largest_gap_users"] < 1
    # reproducible by seed, whatever the order the users come in; another seed draws others
    again = draw_control(rows, scores, 0.1, seed=7, segments=segments)
    np.testing.assert_array_equal(again.control, hold.control)
    perm = rng.permutation(n)
    shuffled = draw_control(rows[perm], scores[perm], 0.1, seed=7, segments=segments[perm])
    assert set(rows[perm][shuffled.control]) == set(rows[hold.control])
    assert set(rows[draw_control(rows, scores, 0.1, seed=8, segments=segments).control]) != set(rows[hold.control])
    # random within strata: over many seeds every user is held out about 10 % of the time
    small = 400
    freq = np.mean([draw_control(rows[:small], scores[:small], 0.1, seed=s, segments=segments[:small]).control
                    for s in range(400)], axis=0)
    assert abs(freq.mean() - 0.1) < 0.005 and np.abs(freq - 0.1).max() < 0.1
    assert abs(np.corrcoef(freq, scores[:small])[0, 1]) < 0.2
    with pytest.raises(ConfigError, match=r"control_frac must be in \[0, 1\)"):
        draw_control(rows, scores, 1.0, seed=1)


def test_target_with_control_never_overlaps_and_works_with_every_solver(bundle, tmp_path):
    rec = Recommender.load(bundle)
    k = rec.stored_segments.k
    cases = [dict(cost=0.5, solver="greedy"), dict(cost=0.5, caps={0: 20}, solver="greedy"),
             dict(cost={s: 0.5 + s for s in range(k)}, solver="lp"), dict(cost={s: 0.5 + s for s in range(k)}, caps={1: 5}, solver="lp"),
             dict(cost=0.5, solver="milp")]
    for case in cases:
        plain, plain_summary, _ = jobs.target_job(rec, 40.0, case["cost"], 20.0, case.get("caps"), case["solver"])
        table, summary, _ = jobs.target_job(rec, 40.0, case["cost"], 20.0, case.get("caps"), case["solver"],
                                            control_frac=0.2, control_seed=11)
        # the same selection as without a control group, split in two groups that never overlap
        assert table["user_id"].tolist() == plain["user_id"].tolist()
        assert table["user_id"].is_unique and set(table["group"]) <= {"treatment", "control"}
        control = summary["control"]
        assert control["control"] == (table["group"] == "control").sum() and control["seed"] == 11
        assert abs(control["control"] - 0.2 * len(table)) < 1
        treated = table[table["group"] == "treatment"]
        assert control["treatment_cost"] == pytest.approx(treated["cost"].sum()) and control["treatment_cost"] <= 40.0
        for seg, cap in (case.get("caps") or {}).items():
            assert (treated["segment"] == seg).sum() <= cap
        again, _, _ = jobs.target_job(rec, 40.0, case["cost"], 20.0, case.get("caps"), case["solver"],
                                      control_frac=0.2, control_seed=11)
        assert again["group"].tolist() == table["group"].tolist()
    fresh, summary, _ = jobs.target_job(rec, 40.0, 0.5, 20.0, control_frac=0.2)
    assert isinstance(summary["control"]["seed"], int)  # drawn, recorded: repeatable
    repeat, _, _ = jobs.target_job(rec, 40.0, 0.5, 20.0, control_frac=0.2, control_seed=summary["control"]["seed"])
    assert repeat["group"].tolist() == fresh["group"].tolist()
    with pytest.raises(ConfigError, match="control_frac"):
        run_task(cli_cfg("task=target", f"artifacts={tmp_path / 'not-read'}", "budget=1", "control_frac=1.5"))
    with pytest.raises(ConfigError, match="score must be one of"):
        run_task(cli_cfg("task=target", f"artifacts={tmp_path / 'not-read'}", "budget=1", "score=lift"))


# -- statistics ----------------------------------------------------------------------------------


def test_intervals_cover_a_planted_lift_about_95_percent_of_the_time():
    """2000 synthetic campaigns at once (users with different rates, a 10 % holdout)."""
    rng = np.random.default_rng(1)
    reps, n_t, n_c = 2000, 1800, 200
    p_c = rng.beta(2, 30, size=n_t + n_c)  # heterogeneous users, mean ~ 0.06
    planted = 0.03
    y_t = rng.random((reps, n_t)) < p_c[:n_t] + planted
    y_c = rng.random((reps, n_c)) < p_c[n_t:]
    true_lift = p_c[:n_t].mean() + planted - p_c[n_t:].mean()
    r = difference_in_proportions(y_t.sum(1), n_t, y_c.sum(1), n_c)
    coverage = np.mean((r["ci_low"] <= true_lift) & (true_lift <= r["ci_high"]))
    assert 0.93 <= coverage <= 0.97, coverage
    # revenue: mostly zeros, log-normal order values (Welch)
    value = lambda y: y * rng.lognormal(3.0, 0.6, size=y.shape)  # noqa: E731
    rev_t, rev_c = value(y_t), value(y_c)
    w = difference_in_means(rev_t.mean(1), rev_t.var(1, ddof=1), n_t, rev_c.mean(1), rev_c.var(1, ddof=1), n_c)
    true_rev = true_lift * np.exp(3.0 + 0.6 ** 2 / 2)
    rev_coverage = np.mean((w["ci_low"] <= true_rev) & (true_rev <= w["ci_high"]))
    assert 0.92 <= rev_coverage <= 0.97, rev_coverage
    # no planted lift: about 5 % false alarms, the interval holds 0 about 95 % of the time
    y_t0 = rng.random((reps, n_t)) < 0.06
    y_c0 = rng.random((reps, n_c)) < 0.06
    r0 = difference_in_proportions(y_t0.sum(1), n_t, y_c0.sum(1), n_c)
    assert 0.03 <= np.mean(r0["p_value"] < 0.05) <= 0.07
    assert 0.93 <= np.mean((r0["ci_low"] <= 0) & (0 <= r0["ci_high"])) <= 0.97
    # small groups and rare conversions: Newcombe's interval keeps its coverage
    small = difference_in_proportions(rng.binomial(60, 0.05, reps), 60, rng.binomial(30, 0.02, reps), 30)
    assert np.mean((small["ci_low"] <= 0.03) & (0.03 <= small["ci_high"])) >= 0.93


def test_qini_curve_of_a_known_ranking():
    treated = np.array([1, 0, 1, 0, 1, 0], bool)
    converted = np.array([1, 0, 1, 0, 0, 1], bool)
    score = np.array([6, 5, 4, 3, 2, 1.0])
    x, q = qini_curve(score, treated, converted)
    # after 2: 1 treated conversion, 0 control of 1 -> 1; after 4: 2 - 0 = 2; after 6: 2 - 1 * 3 / 3 = 1
    np.testing.assert_allclose(q[[2, 4, 6]], [1.0, 2.0, 1.0])
    assert qini_coefficient(score, treated, converted) > 0 > qini_coefficient(-score, treated, converted)


# -- measure -------------------------------------------------------------------------------------


def _measure(learning, out, *extra):
    d = learning["dir"]
    return run_task(cli_cfg("task=measure", f"assignments={d / 'target.csv'}", f"outcomes={d / 'outcomes.csv'}",
                            f"output_dir={out}", *extra))


def test_measure_recovers_the_planted_lift_and_writes_its_report(learning_campaign, truth, tmp_path):
    table = learning_campaign["table"]
    summary = _measure(learning_campaign, tmp_path, "window_days=14")
    treated = table["group"] == "treatment"
    p_t, p_c = truth.meta["p_treated"], truth.meta["p_control"]
    expected = p_t.reindex(table.loc[treated, "user_id"]).mean() - p_c.reindex(table.loc[~treated, "user_id"]).mean()
    assert summary["ci_low"] <= expected <= summary["ci_high"]
    assert summary["significant"] and summary["lift"] > 0
    assert summary["users"] == {"treatment": int(treated.sum()), "control": int((~treated).sum())}
    inc = summary["incremental_conversions"]
    assert inc["estimate"] == pytest.approx(summary["lift"] * treated.sum())
    assert {r["segment"] for r in summary["by_segment"]} == set(table["segment"])
    assert [r["decile"] for r in summary["by_decile"]] == sorted(set(table["decile"]))
    # conversions counted from the file itself
    events = learning_campaign["events"]
    bought = set(events.loc[events["event_type"] == "purchase", "user_id"])
    assert summary["overall"]["conversions_treatment"] == sum(u in bought for u in table.loc[treated, "user_id"])
    assert summary["outcomes"]["unassigned_users_with_events"] == len(set(events["user_id"]) - set(table["user_id"]))
    written = json.loads((tmp_path / "measure_summary.json").read_text())
    assert written["lift"] == summary["lift"] and written["window"]["days"] == 14
    page = (tmp_path / "measure.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Per segment" in page
    assert "| conversion rate |" in (tmp_path / "measure.md").read_text()
    revenue = _measure(learning_campaign, tmp_path / "rev", "metric=revenue")
    assert revenue["metric"] == "revenue" and revenue["lift"] == pytest.approx(revenue["overall"]["revenue_lift"])


def test_measure_reports_no_lift_when_none_is_planted(learning_campaign, truth, bundle, tmp_path):
    d = learning_campaign["dir"]
    nobody = campaign_outcomes(truth, [], days=14, seed=5)  # treated users respond as if never contacted
    odd = nobody.iloc[:1].assign(event_type="refund")  # a type the training run did not accept
    pd.concat([nobody, odd]).to_csv(tmp_path / "outcomes.csv", index=False)
    summary = run_task(cli_cfg("task=measure", f"assignments={d / 'target.csv'}", f"outcomes={tmp_path / 'outcomes.csv'}",
                               f"output_dir={tmp_path}", f"artifacts={bundle}"))
    assert summary["ci_low"] <= 0 <= summary["ci_high"] and not summary["significant"]
    assert any("minimum" not in w and "detectable" in w for w in summary["warnings"])
    assert summary["minimum_detectable_effect"]["lift"] > abs(summary["lift"])
    # read with the bundle's training rules: the unknown type is dropped and counted
    assert summary["outcomes"]["dropped"] == {"unknown_event_type": 1}


@pytest.mark.parametrize("assignments, outcomes, extra, kind, message", [
    ("user_id,group\nu1,treatment\nu2,control\n", None, (), DataError, "outcome events file not found"),
    ("user_id,segment\nu1,1\n", "user_id,timestamp\nu1,1700000000\n", (), DataError, "lacks required column 'group'"),
    ("user_id,group\nu1,treatment\nu2,holdout\n", "user_id,timestamp\nu1,1700000000\n", (), DataError, "row 3 has group='holdout'"),
    ("user_id,group\nu1,treatment\nu1,control\n", "user_id,timestamp\nu1,1700000000\n", (), DataError, "'u1' appears more than once"),
    ("user_id,group\nu1,treatment\nu2,treatment\n", "user_id,timestamp\nu1,1700000000\n", (), DataError, "no user is in the control group"),
    ("user_id,group\nu1,treatment\nu2,control\n", "customer,timestamp\nu1,1700000000\n", (), DataError, "lacks required column 'user_id'"),
    ("user_id,group\nu1,treatment\nu2,control\n", "user_id,timestamp\nu1,soon\nu2,\n", (), DataError, "no events left after cleaning"),
    ("user_id,group\nu1,treatment\nu2,control\n", "user_id,timestamp,event_type\nu1,1700000000,order\n", (), DataError,
     "no 'purchase' events .*conversion_event"),
    ("user_id,group\nu1,treatment\nu2,control\n", "user_id,timestamp\nx9,1700000000\n", (), DataError, "none of the 1 users"),
    ("user_id,group\nu1,treatment\nu2,control\n", "user_id,timestamp\nu1,1700000000\n", ("window_days=-3",), ConfigError, "window_days"),
    ("user_id,group\nu1,treatment\nu2,control\n", "user_id,timestamp\nu1,1700000000\n", ("metric=clicks",), ConfigError, "metric must be"),
])
def test_measure_bad_files_get_one_line_errors(tmp_path, assignments, outcomes, extra, kind, message):
    (tmp_path / "target.csv").write_text(assignments)
    if outcomes is not None:
        (tmp_path / "outcomes.csv").write_text(outcomes)
    with pytest.raises(kind, match=message) as err:
        run_task(cli_cfg("task=measure", f"assignments={tmp_path / 'target.csv'}", f"outcomes={tmp_path / 'outcomes.csv'}",
                         f"output_dir={tmp_path / 'out'}", *extra))
    assert "\n" not in str(err.value)


def test_measure_command_line_exit_status_and_one_line(tmp_path):
    (tmp_path / "target.csv").write_text("user_id,group\nu1,treatment\nu2,control\n")
    done = subprocess.run([sys.executable, "-m", "dmp_dl.audience", "task=measure", f"assignments={tmp_path / 'target.csv'}",
                           f"outcomes={tmp_path / 'nope.csv'}", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: outcome events file not found: {tmp_path / 'nope.csv'} (set outcomes to an existing file)"]


# -- the uplift model ----------------------------------------------------------------------------


def test_uplift_targeting_beats_propensity_on_the_planted_log(with_uplift, truth, tmp_path):
    summary = with_uplift["summary"]
    qini = summary["test"]["qini"]
    assert qini["uplift_model"]["qini"] > qini["propensity"]["qini"]
    rec = Recommender.load(with_uplift["artifacts"])
    true_uplift = (truth.meta["p_treated"] - truth.meta["p_control"]).reindex(rec.user_vocab.ids).to_numpy()
    budget = {"budget": 60.0, "cost": 1.0, "value": 20.0}
    by_uplift, s_up, _ = jobs.target_job(rec, **budget, score="uplift")
    by_propensity, s_prop, _ = jobs.target_job(rec, **budget)
    assert s_up["contacts"] == s_prop["contacts"] == 60  # the same budget, all spent
    gained = {name: true_uplift[rec.user_rows(t["user_id"].tolist())].sum()
              for name, t in (("uplift", by_uplift), ("propensity", by_propensity))}
    assert gained["uplift"] > 2 * gained["propensity"], gained
    assert list(by_uplift.columns[:4]) == ["user_id", "rank", "uplift", "probability"]
    assert s_up["expected_incremental_conversions"] == pytest.approx(by_uplift["uplift"].sum())
    # every solver, caps and a control group work on uplift too; nobody with an expected incremental loss
    k = rec.stored_segments.k
    table, summary, _ = jobs.target_job(rec, 30.0, {s: 0.5 + s for s in range(k)}, 20.0, caps={0: 3}, solver="lp",
                                        score="uplift", control_frac=0.2, control_seed=1)
    assert summary["cost"] <= 30 and (table["segment"] == 0).sum() <= 3
    assert (table["uplift"] * table["value"] > table["cost"]).all() and set(table["group"]) == {"treatment", "control"}
    # the files of the job
    out = with_uplift["out"]
    assert (out / "uplift.html").read_text().count("data:image/png;base64,") == 2
    curves = pd.read_csv(out / "qini.csv")
    assert set(curves["ranking"]) == {"uplift_model", "two_model_logistic", "propensity", "random"}


def test_uplift_model_is_a_bundle_part_served_over_http(with_uplift, rec, tmp_path):
    art = with_uplift["artifacts"]
    b = Bundle.open(art)
    entry = b.manifest["uplift"]
    assert entry["user_aligned"] == [] and "uplift/weights.pt" in b.manifest["files"]
    up = Recommender.load(art)
    assert up.info()["uplift"] and up.uplift_model is not None
    ids = up.user_vocab.ids[:3].tolist()
    scores = up.uplift(ids)
    assert all(-1 <= s["uplift"] <= 1 and s["uplift"] == pytest.approx(s["p_treated"] - s["p_control"]) for s in scores)
    client = TestClient(create_app(up, token="t0ken"))
    auth = {"Authorization": "Bearer t0ken"}
    r = client.post("/uplift", json={"user_ids": ids}, headers=auth)
    assert r.status_code == 200
    assert [u["uplift"] for u in r.json()["users"]] == pytest.approx([s["uplift"] for s in scores])
    assert client.post("/uplift", json={"user_ids": ids}).status_code == 401
    r = client.post("/uplift", json={"user_ids": ["nobody"]}, headers=auth)
    assert r.status_code == 404 and r.json()["error"] == "unknown_id"
    assert client.post("/uplift", json={"user_ids": "u1"}, headers=auth).status_code == 422
    spec = client.get("/openapi.json", headers=auth).json()["paths"]["/uplift"]["post"]["responses"]
    assert {"200", "401", "404", "409", "422"} <= set(spec)
    # a bundle without an uplift model: 409, and score=uplift stops with one line
    r = TestClient(create_app(rec)).post("/uplift", json={"user_ids": rec.user_vocab.ids[:1].tolist()})
    assert r.status_code == 409 and r.json()["error"] == "unavailable" and "task=uplift" in r.json()["detail"]
    with pytest.raises(BundleError, match="no uplift model"):
        jobs.target_job(rec, 10.0, 1.0, 20.0, score="uplift")


def test_erasure_keeps_the_uplift_model_working(with_uplift, tmp_path):
    from dmp_dl.privacy.erasure import erase_rows

    art = tmp_path / "artifacts"
    shutil.copytree(with_uplift["artifacts"], art)
    before = Recommender.load(art)
    keep = before.user_vocab.ids[1:4].tolist()
    expected = before.uplift(keep)
    erase_rows(Bundle.open(art), np.array([0]))
    after = Recommender.load(art)
    assert after.n_users == before.n_users - 1 and after.uplift_model is not None
    assert [s["uplift"] for s in after.uplift(keep)] == pytest.approx([s["uplift"] for s in expected])


def test_uplift_needs_enough_conversions_in_both_groups(bundle, tmp_path):
    rec = Recommender.load(bundle)
    ids = rec.user_vocab.ids[:40]
    pd.DataFrame({"user_id": ids, "group": ["treatment"] * 30 + ["control"] * 10}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"user_id": ids[:12], "timestamp": 1_767_400_000, "event_type": "purchase"}).to_csv(tmp_path / "o.csv", index=False)
    with pytest.raises(DataError, match="the control group has 0 users who converted"):
        run_task(cli_cfg("task=uplift", f"artifacts={bundle}", f"assignments={tmp_path / 't.csv'}",
                         f"outcomes={tmp_path / 'o.csv'}", f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="uplift: unknown key"):
        run_task(cli_cfg("task=uplift", f"artifacts={bundle}", "+uplift.layers=3"))
