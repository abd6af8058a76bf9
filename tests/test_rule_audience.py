"""Rule audiences and audience overlap: the rule language (parsed, never executed), its columns
over a bundle against a pandas reference built from the training data, the command line
(``task=rule``, ``task=overlap``) and the HTTP endpoints (``/audiences/*``)."""

from __future__ import annotations

import itertools
import json
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
from dmp_dl.audience.rule import RuleError, Values, evaluate, parse_rule
from dmp_dl.audience.rule_audience import overlap_job, overlap_of, rule_job, served
from dmp_dl.audience.user_columns import UnknownColumnError, UserColumns, columns_of
from dmp_dl.commands.audience import run_task
from dmp_dl.core.errors import UnknownIdError
from dmp_dl.pipeline.run import run
from dmp_dl.propensity.features import BehaviourSpec
from dmp_dl.realtime.behaviour import BehaviourStats
from dmp_dl.realtime.part import RealtimePart

from .conftest import CONF_DIR, QUIET_TRAINER, TINY_DATA, compose_cfg

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0


def cli_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("audience_cli", overrides=list(overrides))


class Table:
    """A column source over a pandas DataFrame: numeric columns as numbers, object columns as
    categorical values (one per user)."""

    def __init__(self, frame: pd.DataFrame):
        self.frame, self.n_users = frame, len(frame)

    def values(self, name: str) -> Values:
        if name not in self.frame:
            raise RuleError(f"rule: unknown column {name!r}")
        col = self.frame[name]
        if not pd.api.types.is_numeric_dtype(col):
            codes = {v: i for i, v in enumerate(sorted(col.dropna().unique()))}
            return Values(tokens=col.map(codes).fillna(-1).to_numpy(np.float64).astype(np.int64)[:, None], codes=codes)
        return Values(numbers=col.to_numpy(np.float64))


@pytest.fixture(scope="module")
def with_propensity(tmp_path_factory):
    """A one-batch run (debug=fdr) with the propensity model: the bundle stores per-user event statistics."""
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "debug=fdr", "logger=none"], tmp_path_factory.mktemp("rules") / "run")
    return run(cfg)


# -- the language --------------------------------------------------------------------------------


def test_rules_follow_the_grammar_and_match_pandas():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=200), "y": rng.integers(0, 5, 200).astype(float),
                          "region": rng.choice(["east", "west", "north"], 200).astype(object)})
    frame.loc[::17, "x"] = np.nan  # unknown values match no comparison
    source = Table(frame)
    x, y, region = frame["x"], frame["y"], frame["region"]
    cases = {
        "x > 0.5": x > 0.5,
        "0.5 < x": x > 0.5,
        "x >= -0.25 AND y != 3": (x >= -0.25) & (y != 3) & x.notna(),
        "y = 2 or y == 4 and x < 0": (y == 2) | ((y == 4) & (x < 0)),  # and binds tighter than or
        "(y = 2 or y == 4) and x < 0": ((y == 2) | (y == 4)) & (x < 0),
        "not x > 0": ~(x > 0),
        "not (x > 0 or y in [1, 2])": ~((x > 0) | y.isin([1, 2])),
        "y not in [0, 1e0] and region in ['east', \"north\"]": ~y.isin([0, 1]) & region.isin(["east", "north"]),
        "region != 'west' and `x` <= 1.5e-1": (region != "west") & (x <= 0.15),
        "x != y": (x != y) & x.notna(),
        "region == 'south'": pd.Series(False, index=frame.index),
    }
    for text, expected in cases.items():
        np.testing.assert_array_equal(evaluate(parse_rule(text), source), expected.to_numpy(bool), err_msg=text)
    assert parse_rule("interest.`Sci-Fi` > 0.2 and event.view >= 1").columns == ("interest.Sci-Fi", "event.view")


@pytest.mark.parametrize("text, message", [
    ("x >", r"^rule: expected a column name, a number or a quoted text at position 4, found end of the rule$"),
    ("x > 1 and (y < 2", r"^rule: expected '\)' at position 17, found end of the rule$"),
    ("x > 1 y < 2", r"^rule: expected and, or or the end of the rule at position 7, found 'y'$"),
    ("x @ 1", r"^rule: unexpected character '@' at position 3$"),
    ("x in 1, 2", r"^rule: expected '\[' to open the list after 'in' at position 6"),
    ("1 < 2", r"compares two constants; name a column"),
    ("x > 'high'", r"^rule: position 5: 'high' is a text, but the other side .* give a number$"),
    ("region > 'east'", r"^rule: position 1: region is categorical; use ==, != or in, not >$"),
    ("nope > 1", r"^rule: position 1: unknown column 'nope'$"),
    ("(" * 60 + "x > 1" + ")" * 60, r"nested more than 50 deep"),
    ("", r"^rule must be a non-empty text"),
])
def test_a_bad_rule_is_one_message_naming_the_position_or_the_column(text, message):
    source = Table(pd.DataFrame({"x": [1.0, 2.0], "region": ["east", "west"]}).astype({"region": object}))
    with pytest.raises(RuleError, match=message):
        evaluate(parse_rule(text), source)


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch {marker}')",
    "x > 0 or __import__('os').system('touch {marker}') == 0",
    "`__import__('os').system('touch {marker}')` > 0",
    "x.__class__.__bases__ > 0",
    "open('{marker}', 'w') == 1",
    "x > 0; import os",
    "x > 0 # comment",
    "lambda: 0",
])
def test_code_in_a_rule_is_refused_and_never_run(text, tmp_path):
    marker = tmp_path / "ran"
    source = Table(pd.DataFrame({"x": [1.0, 2.0]}))
    with pytest.raises(RuleError):
        evaluate(parse_rule(text.format(marker=marker)), source)
    assert not marker.exists()


# -- columns over a bundle -----------------------------------------------------------------------


def test_activity_columns_follow_the_events():
    rng = np.random.default_rng(1)
    n_users, end = 6, 100 * DAY
    user = rng.integers(0, 5, 60)  # user 5 has no events
    t = np.sort(rng.uniform(0, end, 60))
    layout = BehaviourStats(BehaviourSpec(["view", "purchase"]))
    stats = layout.from_events(user, t, rng.integers(0, 2, 60), np.zeros(60), n_users, end)
    part = RealtimePart({"data_end": int(end)}, None, stats, None, None, None, None, None)
    activity = part.activity()
    events = pd.DataFrame({"user": user, "t": t})
    by_user = events.groupby("user")["t"]
    reference = pd.DataFrame({"events": by_user.size(), "recency_days": (end - by_user.max()) / DAY,
                              "tenure_days": (end - by_user.min()) / DAY,
                              "active_days": events.assign(day=np.floor(t / DAY)).groupby("user")["day"].nunique()}
                             ).reindex(range(n_users))
    reference["events"] = reference["events"].fillna(0)
    reference["active_days"] = reference["active_days"].fillna(0)
    for name in reference:
        np.testing.assert_allclose(activity[name], reference[name].to_numpy(float), rtol=1e-9, err_msg=name)
    assert RealtimePart({"data_end": 1}, None, None, None, None, None, None, None).activity() is None


def _reference(result, rec) -> pd.DataFrame:
    """Each user's columns recomputed from the run's data and the public per-user API."""
    dm = result["datamodule"]
    ids = rec.user_vocab.ids
    rows = []
    for user in ids:
        profile = rec.profile(user)
        rows.append({**{f"interest_{i['category']}": i["share"] for i in profile["interests"]},
                     **{f"event_{k}": v for k, v in profile["event_types"].items()}})
    frame = pd.DataFrame(rows, index=ids).fillna({f"interest_{c}": 0.0 for c in rec.profiles.categories})
    frame["segment"] = [rec.segment(u)["segment"] for u in ids]
    frame["propensity"] = rec.propensity(list(ids))
    events = dm.events
    end = float(events["timestamp"].max())
    by_user = events.groupby("user_idx")["timestamp"]
    frame["recency_days"] = ((end - by_user.max()) / DAY).reindex(range(len(ids))).to_numpy()
    frame["events"] = by_user.size().reindex(range(len(ids))).fillna(0).to_numpy()
    users = dm.log_.users.set_index("user_id").reindex(ids)
    # a user without a region holds no value: == matches no one of them, != and not in all of them
    frame["age"], frame["region"] = users["age"].to_numpy(float), users["region"].fillna("").astype(object).to_numpy()
    return frame


def test_rule_audiences_match_a_pandas_reference_on_a_bundle(with_propensity):
    rec = Recommender.load(with_propensity["bundle_dir"])
    frame = _reference(with_propensity, rec)
    top = frame[[c for c in frame if c.startswith("interest_")]].mean().idxmax().removeprefix("interest_")
    rules = {  # rule -> the same selection as a pandas query over the reference
        f"interest.{top} > 0.2": f"interest_{top} > 0.2",
        f"interest.{top} > 0.1 and recency_days <= 30 and propensity > 0.2":
            f"interest_{top} > 0.1 and recency_days <= 30 and propensity > 0.2",
        "segment in [0, 2] or event.purchase >= 0.5": "segment in [0, 2] or event_purchase >= 0.5",
        "not (attr.region == 'east') and age > 40 and events >= 20": "region != 'east' and age > 40 and events >= 20",
    }
    for rule, query in rules.items():
        table, summary = rule_job(rec, rule)
        expected = frame.query(query).index
        assert 0 < len(expected) < rec.n_users, (rule, len(expected))  # each rule splits the users
        assert table["user_id"].tolist() == expected.tolist(), rule
        assert summary["users"] == len(expected) and summary["share"] == pytest.approx(len(expected) / rec.n_users)
        assert sum(summary["by_segment"].values()) == len(expected)
    table, _ = rule_job(rec, f"interest.{top} > 0.1 and recency_days <= 30")
    np.testing.assert_allclose(table[f"interest.{top}"], frame.loc[table["user_id"], f"interest_{top}"], rtol=1e-5)
    np.testing.assert_allclose(table["recency_days"], frame.loc[table["user_id"], "recency_days"], rtol=1e-9)


def test_a_bundle_without_per_user_crm_columns_refuses_rules_on_them_instead_of_matching_no_one(rec):
    """A bundle without the user_table part (exported before it, from a network that reads no user
    attributes) keeps no CRM column per user, and the propensity model stores only their encoding
    for new users (one row): a rule on ``attr.region`` must say so, not select nobody."""
    import copy

    from dmp_dl.data.features import FeatureTable

    bare = copy.copy(rec)
    assert rec.user_table is not None  # the part a bundle now keeps
    bare.user_features = bare.user_table = None
    with pytest.raises(UnknownColumnError, match=r"'attr.region' is not available: this bundle holds no user-table"):
        UserColumns(bare).resolve("attr.region")
    with pytest.raises(UnknownColumnError, match=r"unknown column 'region'; no user-table column is available"):
        UserColumns(bare).resolve("region")
    one_row = copy.copy(rec.user_features)
    assert isinstance(one_row, FeatureTable) and len(one_row.tokens) > rec.n_users
    one_row.tokens, one_row.numeric = one_row.tokens[:1], one_row.numeric[:1]
    bare._propensity = type("Scorer", (), {"features": type("Features", (), {"attributes": one_row})()})()
    with pytest.raises(UnknownColumnError, match=r"is not available"):
        UserColumns(bare).resolve("attr.region")
    assert UserColumns(rec).resolve("region") == "attr.region"  # the autoencoder's bundle has them


def test_columns_a_bundle_lacks_are_named_with_the_reason(trained, rec):
    columns = UserColumns(rec)  # the session bundle: no propensity model, hence no event statistics
    with pytest.raises(UnknownColumnError, match=r"column 'propensity' is not available: this bundle has no propensity model"):
        columns.values("propensity")
    with pytest.raises(UnknownColumnError, match=r"'recency_days' is not available"):
        columns.values("recency_days")
    category = rec.profiles.categories[0]
    with pytest.raises(UnknownColumnError, match=rf"unknown column '{category.upper()}' .*did you mean 'interest.{category}'"
                                                 r".*the columns are: segment, distinct_items, "):
        columns.values(category.upper())
    assert columns.resolve("region") == "attr.region"  # a CRM column by its own name
    np.testing.assert_array_equal(columns.values("distinct_items").numbers, rec.user_activity())


# -- overlap -------------------------------------------------------------------------------------


def test_overlap_counts_and_jaccard_match_sets():
    rng = np.random.default_rng(2)
    members = rng.random((300, 4)) < [0.1, 0.4, 0.4, 0.0]  # the last audience is empty
    names = ["a", "b", "c", "empty"]
    report = overlap_of(names, members)
    sets = {n: set(np.flatnonzero(members[:, i])) for i, n in enumerate(names)}
    assert report["sizes"] == {n: len(s) for n, s in sets.items()}
    assert [(p["a"], p["b"]) for p in report["pairs"]] == list(itertools.combinations(names, 2))
    for p in report["pairs"]:
        a, b = sets[p["a"]], sets[p["b"]]
        assert (p["intersection"], p["union"]) == (len(a & b), len(a | b))
        assert p["jaccard"] == (len(a & b) / len(a | b) if a | b else 0.0)
        assert p["share_of_a"] == (len(a & b) / len(a) if a else 0.0)
        assert report["intersection"][p["a"]][p["b"]] == report["intersection"][p["b"]][p["a"]] == len(a & b)


def test_overlap_of_rules_segments_id_lists_and_files(trained, rec, tmp_path):
    saved = tmp_path / "vip.csv"
    ids = rec.user_vocab.ids
    pd.DataFrame({"user_id": [*ids[:30], "gone-1", "gone-2"]}).to_csv(saved, index=False)
    audiences = {"s0": {"segment": 0}, "rule": {"rule": "segment == 0 or distinct_items >= 40"},
                 "listed": {"user_ids": list(ids[10:50])}, "saved": {"file": str(saved)}}
    table, summary = overlap_job(rec, audiences)
    seg = rec.stored_segments.assignments
    expected = {"s0": set(np.flatnonzero(seg == 0)),
                "rule": set(np.flatnonzero((seg == 0) | (rec.user_activity() >= 40))),
                "listed": set(range(10, 50)), "saved": set(range(30))}
    assert summary["sizes"] == {n: len(s) for n, s in expected.items()}
    saved_info = next(a for a in summary["audiences"] if a["name"] == "saved")
    assert saved_info["unknown_ids"] == 2 and saved_info["given"] == 32  # counted, not matched
    for row in table.itertuples():
        a, b = expected[row.a], expected[row.b]
        assert row.intersection == len(a & b) and row.jaccard == pytest.approx(len(a & b) / len(a | b))
    with pytest.raises(UnknownIdError, match=r"audience 'x': segment 99 does not exist"):
        overlap_job(rec, {"x": {"segment": 99}, "y": {"segment": 0}})
    with pytest.raises(RuleError, match=r"^audience 'y': rule: position 1: unknown column 'nope'"):
        overlap_job(rec, {"x": {"segment": 0}, "y": {"rule": "nope > 1"}})
    with pytest.raises(Exception, match=r"give 2 to 20 named audiences"):
        overlap_job(rec, {"x": {"segment": 0}})


def test_withheld_users_are_in_no_audience(rec):
    class Live:  # what a real-time server's view offers: the users it withholds while erasing them
        _service = object()
        _withheld = {str(rec.user_vocab.ids[3])}
        n_users, user_vocab = rec.n_users, rec.user_vocab

    keep = served(Live())
    assert not keep[3] and keep.sum() == rec.n_users - 1


# -- command line --------------------------------------------------------------------------------


def test_cli_rule_preview_writes_nothing_and_a_run_writes_the_members(trained, rec, tmp_path):
    art = f"artifacts={trained['bundle_dir']}"
    activity, segments = rec.user_activity(), rec.stored_segments.assignments
    segment = int(segments[np.argmax(activity)])  # the most active user's: a segment with members of 30+ items
    rule = f"segment == {segment} and distinct_items >= 30"
    expected = rec.user_vocab.ids[(segments == segment) & (activity >= 30)]
    summary = run_task(cli_cfg("task=rule", art, f"output_dir={tmp_path / 'preview'}", f"rule='{rule}'", "preview=true"))
    assert summary["users"] == len(expected) > 0 and summary["preview"] and "files" not in summary
    assert not (tmp_path / "preview").exists() or not any((tmp_path / "preview").iterdir())
    summary = run_task(cli_cfg("task=rule", art, f"output_dir={tmp_path / 'out'}", f"rule='{rule}'"))
    table = pd.read_csv(tmp_path / "out" / "rule.csv", dtype={"user_id": str})
    assert table["user_id"].tolist() == expected.tolist()
    assert list(table.columns) == ["user_id", "segment", "distinct_items"]
    assert json.loads((tmp_path / "out" / "rule_summary.json").read_text())["users"] == len(expected)


def test_cli_bad_rule_is_one_error_line_and_exit_2(trained, tmp_path):
    cmd = [sys.executable, "-m", "dmp_dl.audience", "task=rule", f"artifacts={trained['bundle_dir']}",
           f"output_dir={tmp_path}", "rule='interest.nothing > 0.2 and segment == 1'"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rule: position 1: unknown column 'interest.nothing'"), done.stderr
    assert "the columns are: segment, distinct_items" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "rule.csv").exists()


def test_cli_overlap_prints_a_table_and_writes_the_pairs(trained, rec, tmp_path):
    cmd = [sys.executable, "-m", "dmp_dl.audience", "task=overlap", f"artifacts={trained['bundle_dir']}",
           f"output_dir={tmp_path}", "audiences={active: 'distinct_items >= 30', first: 0, second: 1}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    seg, active = rec.stored_segments.assignments, rec.user_activity() >= 30
    lines = done.stdout.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.split() == ["audience", "users", "share"]):]
    assert lines[1].split()[:2] == ["active", str(int(active.sum()))]
    pair = next(line for line in lines if line.startswith("active") and " first " in f" {line} ")
    both = int((active & (seg == 0)).sum())
    assert pair.split()[2] == str(both)
    pairs = pd.read_csv(tmp_path / "overlap.csv")
    assert len(pairs) == 3 and pairs.set_index(["a", "b"]).loc[("first", "second"), "intersection"] == 0
    summary = json.loads((tmp_path / "overlap_summary.json").read_text())
    assert summary["sizes"]["first"] == int((seg == 0).sum())


# -- HTTP ----------------------------------------------------------------------------------------


def test_http_rule_preview_overlap_and_errors(rec):
    client = TestClient(create_app(rec))
    rule = "segment == 2 or distinct_items < 20"
    r = client.post("/audiences/rule", json={"rule": rule, "ids": 5})
    assert r.status_code == 200, r.text
    _, summary = rule_job(rec, rule)
    body = r.json()
    assert (body["users"], body["share"], body["by_segment"]) == (summary["users"], summary["share"], summary["by_segment"])
    members = rec.user_vocab.ids[(rec.stored_segments.assignments == 2) | (rec.user_activity() < 20)]
    assert body["user_ids"] == members[:5].tolist()
    for bad, expected in [("distinct_items > 'x'", "position 18"), ("interest.nothing > 0.2", "unknown column 'interest.nothing'"),
                          ("__import__('os').getcwd()", "is a call"), ("segment ==", "position 11")]:
        r = client.post("/audiences/rule", json={"rule": bad})
        assert r.status_code == 422 and r.json()["error"] == "invalid_rule" and expected in r.json()["detail"], r.text
    assert client.post("/audiences/rule", json={"rule": rule, "ids": -1}).json()["error"] == "invalid_request"
    r = client.post("/audiences/overlap", json={"audiences": {"r": {"rule": rule}, "s": {"segment": 2},
                                                              "u": {"user_ids": [*members[:3].tolist(), "ghost"]}}})
    assert r.status_code == 200, r.text
    pairs = {(p["a"], p["b"]): p for p in r.json()["pairs"]}
    size_s = int((rec.stored_segments.assignments == 2).sum())
    assert pairs[("r", "s")]["intersection"] == size_s and pairs[("r", "s")]["union"] == summary["users"]
    assert pairs[("r", "u")]["intersection"] == 3 and r.json()["audiences"][2]["unknown_ids"] == 1
    r = client.post("/audiences/overlap", json={"audiences": {"r": {"rule": "nope > 1"}, "s": {"segment": 2}}})
    assert r.status_code == 422 and r.json()["error"] == "invalid_rule" and "audience 'r'" in r.json()["detail"]
    r = client.post("/audiences/overlap", json={"audiences": {"r": {"segment": 1}, "s": {"segment": 99}}})
    assert r.status_code == 404 and r.json()["kind"] == "segment"
    r = client.post("/audiences/overlap", json={"audiences": {"r": {"segment": 1, "rule": rule}, "s": {"segment": 0}}})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert client.get("/audiences/columns").json() == columns_of(rec).names()
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/audiences/rule", "/audiences/overlap"):
        assert {"200", "422"} <= set(paths[path]["post"]["responses"])
        assert "invalid_rule" in paths[path]["post"]["responses"]["422"]["description"]
