"""What ``task=measure`` may claim: not enough data below what groups can show, exact and permutation
methods for small groups, an honest minimum detectable effect, the confidence level and p-values
written the same way everywhere; control groups that leave users to contact; standard JSON."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from scipy.stats import norm

from dmp_dl.audience.targeting import per_user, plan_contacts
from dmp_dl.campaign.control import draw_control
from dmp_dl.campaign.jobs import summary_json
from dmp_dl.campaign.measure import compare_groups, p_text, percent
from dmp_dl.campaign.stats import (
    minimum_detectable_effect,
    minimum_detectable_lift,
    permutation_inference,
    smallest_p_value,
)
from dmp_dl.commands.audience import run_task
from dmp_dl.core.errors import ConfigError, DataError

from .conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000


def cli_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("audience_cli", overrides=[*overrides, "num_threads=1"])


def write_campaign(folder: Path, n_t: int, n_c: int, converted_t: int, converted_c: int, value=10.0,
                   segments: int | None = None, control_value=None) -> tuple[Path, Path]:
    """target.csv with n_t treated and n_c control users (u0.. treated first), and an outcome log in
    which the first ``converted_*`` users of each group bought for ``value`` (control:
    ``control_value``, default the same) and every user viewed something."""
    ids = [f"u{i}" for i in range(n_t + n_c)]
    groups = ["treatment"] * n_t + ["control"] * n_c
    table = pd.DataFrame({"user_id": ids, "group": groups})
    if segments:
        table["segment"] = np.arange(n_t + n_c) % segments
    buyers = ids[:converted_t] + ids[n_t:n_t + converted_c]
    values = [value] * converted_t + [value if control_value is None else control_value] * converted_c
    events = pd.concat([
        pd.DataFrame({"user_id": ids, "timestamp": T0, "event_type": "view", "value": 0.0}),
        pd.DataFrame({"user_id": buyers, "timestamp": T0 + 3600, "event_type": "purchase", "value": values}),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "target.csv", index=False)
    events.to_csv(folder / "outcomes.csv", index=False)
    return folder / "target.csv", folder / "outcomes.csv"


def measure(folder: Path, *extra: str) -> dict:
    return run_task(cli_cfg("task=measure", f"assignments={folder / 'target.csv'}", f"outcomes={folder / 'outcomes.csv'}",
                            f"output_dir={folder / 'out'}", *extra))


def assert_not_enough_data(summary: dict, folder: Path, reason: str, caplog) -> None:
    """The headline says not enough data, with no interval, p-value or significance, one warning."""
    assert summary["verdict"] == "not enough data" and re.search(reason, summary["reason"]), summary["reason"]
    assert summary["significant"] is False
    for key in ("lift", "ci_low", "ci_high", "p_value", "p_value_method"):
        assert summary[key] is None, key
    incremental = "incremental_conversions" if summary["metric"] == "conversion" else "incremental_revenue"
    assert summary[incremental] == {"estimate": None, "ci_low": None, "ci_high": None}
    assert summary["minimum_detectable_effect"]["lift"] is None
    assert summary["warnings"] == [f"not enough data to measure the {summary['metric']} lift: {summary['reason']}"]
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dmp_dl")]
    assert [r.getMessage() for r in warned] == summary["warnings"]
    written = json.loads((folder / "out" / "measure_summary.json").read_text())
    assert written["verdict"] == "not enough data" and written["p_value"] is None and written["ci_low"] is None
    report = (folder / "out" / "measure.md").read_text()
    assert "Headline" in report and "not enough data" in report.split("Headline")[1].splitlines()[0]


# -- not enough data -----------------------------------------------------------------------------


def test_one_treated_and_one_control_user_is_not_enough_data(tmp_path, caplog):
    write_campaign(tmp_path, 1, 1, 1, 0)
    with caplog.at_level(logging.INFO):
        summary = measure(tmp_path)
    assert_not_enough_data(summary, tmp_path, r"1 treated and 1 control users no outcome could be significant", caplog)
    assert "conversion: not enough data (1 treated, 1 control users)" in caplog.text


def test_two_against_two_users_give_no_interval_for_revenue(tmp_path, caplog):
    # every treated user bought for 10, no control did: Welch's t made this [10, 10], p = 0
    write_campaign(tmp_path, 2, 2, 2, 0)
    with caplog.at_level(logging.INFO):
        summary = measure(tmp_path, "metric=revenue")
    assert_not_enough_data(summary, tmp_path, r"smallest p-value groups this size can give is 0.333", caplog)
    assert summary["overall"]["revenue_reason"] == summary["reason"]


def test_a_window_after_every_event_is_not_enough_data(tmp_path, caplog):
    write_campaign(tmp_path, 60, 60, 30, 10)
    with caplog.at_level(logging.INFO):
        summary = measure(tmp_path, f"start={T0 + 86400}", "window_days=7")
    assert_not_enough_data(summary, tmp_path, r"no event in the window .*\(160 events before it, 0 after it\)", caplog)
    assert summary["outcomes"]["events_in_window"] == 0


def test_groups_without_any_revenue_spread_give_no_interval(tmp_path, caplog):
    # 40 against 40 users, every one of them buying for exactly their group's amount: nothing to estimate a spread from
    write_campaign(tmp_path, 40, 40, 40, 40, value=10.0, control_value=5.0)
    with caplog.at_level(logging.INFO):
        summary = measure(tmp_path, "metric=revenue")
    assert_not_enough_data(summary, tmp_path, r"without any spread within the groups", caplog)


def test_the_smallest_p_value_groups_can_give():
    # Fisher's exact test on a complete separation: the floor for every outcome of these group sizes
    from scipy.stats import fisher_exact

    for n_t, n_c in ((1, 1), (2, 2), (3, 3), (4, 4), (3, 10), (25, 2), (6, 5)):
        separated = fisher_exact([[n_t, 0], [0, n_c]])[1]
        assert smallest_p_value(n_t, n_c) == pytest.approx(separated)
        every = [fisher_exact([[x, n_t - x], [y, n_c - y]])[1] for x in range(n_t + 1) for y in range(n_c + 1)]
        assert min(every) == pytest.approx(float(smallest_p_value(n_t, n_c)))
    assert smallest_p_value(0, 10) == 1.0


# -- small groups: exact and permutation methods -------------------------------------------------


def test_small_groups_use_exact_methods_and_their_interval_agrees_with_their_test(tmp_path, caplog):
    write_campaign(tmp_path, 200, 20, 51, 0, segments=15)
    with caplog.at_level(logging.INFO):
        conversion = measure(tmp_path, "confidence=0.99")
    assert conversion["p_value_method"] == "fisher_exact" and conversion["interval_method"] == "newcombe"
    assert conversion["verdict"] == "significant" and conversion["p_value"] < 0.01
    # Fisher's test and Newcombe's interval differ on this margin: said, not hidden
    assert conversion["ci_low"] < 0 and any("borderline" in w for w in conversion["warnings"])
    assert any("control group has only 20 users (fewer than 30)" in w for w in conversion["warnings"])
    revenue = measure(tmp_path, "metric=revenue", "confidence=0.99")
    assert revenue["p_value_method"] == revenue["interval_method"] == "permutation"
    assert (revenue["ci_low"] > 0) == revenue["significant"]
    # per segment: 1-2 control users in each; the rows too small to show anything say so
    for row in revenue["by_segment"]:
        if row["revenue_reason"] is None:
            assert row["revenue_p_value_method"] == "permutation"
            assert (row["revenue_ci_low"] > 0 or row["revenue_ci_high"] < 0) == (row["revenue_p_value"] < 0.01)
        else:
            assert row["revenue_ci_low"] is None and row["revenue_p_value"] is None
    assert any(r["revenue_reason"] for r in revenue["by_segment"])
    assert "not enough data" in (tmp_path / "out" / "measure.md").read_text().split("## Per segment")[1]


def test_permutation_interval_covers_a_planted_shift_and_matches_its_test():
    rng = np.random.default_rng(4)
    shift, covered, agree = 2.0, [], []
    for _ in range(300):
        y_t = rng.exponential(3.0, 15) + shift
        y_c = rng.exponential(3.0, 12)
        p, low, high = permutation_inference(y_t, y_c, 0.9, resamples=999, seed=int(rng.integers(1 << 30)))
        covered.append(low <= shift <= high)
        agree.append((low > 0 or high < 0) == (p < 0.1))
    assert 0.86 <= np.mean(covered) <= 0.94, np.mean(covered)
    assert np.mean(agree) >= 0.99
    # every relabelling when there are few: 5 against 5 perfectly separated is 2 / C(10, 5)
    p, low, high = permutation_inference([10, 12, 9, 11, 10.0], [0, 1, 0, 2, 0.0], 0.95)
    assert p == pytest.approx(2 / 252) and 0 < low < 10.2 - 0.6 < high


def test_a_large_arm_against_a_small_one_is_resampled_in_the_small_ones_size():
    rng = np.random.default_rng(0)
    y_t, y_c = rng.exponential(1.0, 200_000), rng.exponential(1.0, 20) + 0.5
    p, low, high = permutation_inference(y_t, y_c, 0.95)
    assert 0 <= p <= 1 and low < y_t.mean() - y_c.mean() < high


# -- the minimum detectable effect ---------------------------------------------------------------


@pytest.mark.parametrize("rate_control, n", [(0.0, 300), (0.05, 1000), (0.3, 300)])
def test_minimum_detectable_lift_has_its_power_even_at_a_control_rate_of_0(rate_control, n):
    """At the minimum detectable lift, the test measure uses (Fisher's exact test for small counts,
    else the z-test) finds the lift about 80 % of the time, also when the control never converts."""
    mde = float(minimum_detectable_lift(rate_control, n, n))
    assert mde > 0
    rng = np.random.default_rng(2)
    reps = 600  # Fisher's test runs row by row: a few seconds
    keys = np.repeat(np.arange(reps), 2 * n)
    control = np.tile(np.r_[np.zeros(n, bool), np.ones(n, bool)], reps)
    converted = rng.random(len(keys)) < np.where(control, rate_control, rate_control + mde)
    table = compare_groups(keys, control, converted, np.zeros(len(keys)), 0.95)
    power = np.mean(table["conversion_p_value"] < 0.05)
    assert 0.74 <= power <= 0.88, power


def test_measured_control_rate_of_0_gives_a_detectable_lift_above_0(tmp_path):
    write_campaign(tmp_path, 300, 300, 2, 0)
    summary = measure(tmp_path)
    mde = summary["minimum_detectable_effect"]["lift"]
    assert summary["overall"]["conversion_rate_control"] == 0 and summary["verdict"] == "not significant"
    assert mde == pytest.approx(float(minimum_detectable_lift(0.0, 300, 300))) and mde > 0.01
    # the formula with the control's spread alone says 0: the number it used to print
    assert float(minimum_detectable_effect(0.0, 300, 300)) == 0
    assert any(f"detectable at 80 % power and 95 % confidence is {mde:.4g}" in w for w in summary["warnings"])


# -- confidence and p-values, the same everywhere ------------------------------------------------


def test_confidence_level_and_p_value_are_written_as_computed_everywhere(tmp_path, caplog):
    write_campaign(tmp_path, 400, 400, 120, 40)
    with caplog.at_level(logging.INFO):
        summary = measure(tmp_path, "confidence=0.999")
    assert summary["confidence"] == 0.999 and summary["significant"]
    z = norm.ppf(0.9995)
    assert summary["ci_high"] - summary["lift"] > 0.9 * z * summary["overall"]["conversion_se"]
    p = p_text(summary["p_value"])
    line = next(r.getMessage() for r in caplog.records if "lift" in r.getMessage() and "interval" in r.getMessage())
    assert "99.9 % interval" in line and f"p = {p} " in line and "95" not in line
    for name in ("measure.md", "measure.html"):
        text = (tmp_path / "out" / name).read_text()
        assert "99.9 % interval" in text and f"p-value {p} " in text and "95 %" not in text
        assert "significant at 99.9 % confidence" in text
    assert percent(0.9999999999) == "99.99999999" and percent(0.95) == "95"
    assert p_text(0.0) == "< 1e-16" and p_text(None) == "–" and p_text(0.04567) == "0.0457"


@pytest.mark.parametrize("extra, message", [
    ("confidence=0.9999999999", r"confidence must be a number in \[0.5, 0.999\], got 0.9999999999"),
    ("confidence=0.3", r"confidence must be a number in \[0.5, 0.999\]"),
    ("window_days=1e308", r"window_days must be a number in \(0, 36525\] or null, got 1e\+308"),
    ("start=1e300", r"start must be epoch seconds or an ISO-8601 time from 1970-01-01 to 2200-01-01"),
    ("start=-99999999999999", r"start must be epoch seconds or an ISO-8601 time .*got -99999999999999"),
    ("start=next-week", r"start must be epoch seconds or an ISO-8601 time"),
    ("outcome_columns={user: uid}", r"outcome_columns renames 'user'; the names to map are user_id, timestamp"),
])
def test_measure_settings_are_one_line_before_any_file_is_read(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        run_task(cli_cfg("task=measure", f"assignments={tmp_path / 'never-read.csv'}", f"outcomes={tmp_path / 'nor-this.csv'}",
                         f"output_dir={tmp_path / 'out'}", extra))
    assert "\n" not in str(err.value)


def test_a_breakdown_id_out_of_range_names_its_row(tmp_path):
    write_campaign(tmp_path, 3, 3, 1, 0)
    table = pd.read_csv(tmp_path / "target.csv").astype({"user_id": str})
    table["segment"] = ["0", "1", "1e30", "2", "0", "1"]
    table.to_csv(tmp_path / "target.csv", index=False)
    with pytest.raises(DataError, match=r"row 4 has segment='1e30'; segment must be a whole number in 0..2147483647"):
        measure(tmp_path)
    table["segment"] = 0
    table["decile"] = [1, 2, 3, 11, 1, 2]
    table.to_csv(tmp_path / "target.csv", index=False)
    with pytest.raises(DataError, match=r"row 5 has decile='11'; decile must be a whole number in 1..10"):
        measure(tmp_path)


@pytest.mark.parametrize("override", ["outcome_columns={user_id: uid, timestamp: ts}",
                                      "+outcome_columns={user_id: uid, timestamp: ts}"])
def test_outcome_columns_in_the_documented_syntax(tmp_path, override):
    write_campaign(tmp_path, 40, 40, 20, 5)
    events = pd.read_csv(tmp_path / "outcomes.csv").rename(columns={"user_id": "uid", "timestamp": "ts"})
    events.to_csv(tmp_path / "outcomes.csv", index=False)
    summary = measure(tmp_path, override)
    assert summary["overall"]["conversions_treatment"] == 20 and summary["overall"]["conversions_control"] == 5


def test_measure_command_refuses_an_absurd_window_in_one_line(tmp_path):
    write_campaign(tmp_path, 2, 2, 1, 0)
    done = subprocess.run([sys.executable, "-m", "dmp_dl.audience", "task=measure", f"assignments={tmp_path / 'target.csv'}",
                           f"outcomes={tmp_path / 'outcomes.csv'}", f"output_dir={tmp_path / 'out'}", "window_days=1e308"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["error: window_days must be a number in (0, 36525] or null, got 1e+308"]
    assert not (tmp_path / "out").exists()


# -- targeting: amounts, segments, control groups, JSON ------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ("value=1e308", r"value must be a number in \[0, 1e\+12\], or a \{segment: value\} mapping"),
    ("cost={0: 1, 1: 1e30}", r"cost gives segment 1 1e\+30; each value must be a number in \[0, 1e\+12\]"),
    ("cost={1e30: 1}", r"cost has segment 1e\+30; a segment is a whole number in 0..2147483647"),
    ("caps={0: 1e30}", r"caps gives segment 0 1e\+30; each value must be an integer in 0..2147483647"),
    ("budget=1e300", r"budget must be a number in \[0, 1e\+12\]"),
    ("budget=null", r"budget is required: the most to spend on contacts"),
    ("gains_points=1000000000", r"gains_points must be an integer in 1..10000"),
    ("time_limit=1e308", r"time_limit must be a number in \(0, 604800\]"),
])
def test_target_settings_are_one_line_before_the_bundle_is_read(tmp_path, extra, message):
    overrides = ["task=target", f"artifacts={tmp_path / 'not-read'}", f"output_dir={tmp_path / 'out'}"]
    overrides += [] if extra.startswith("budget") else ["budget=10"]
    with pytest.raises(ConfigError, match=message) as err:
        run_task(cli_cfg(*overrides, extra))
    assert "\n" not in str(err.value)


def test_amounts_are_bounded_and_per_segment_tables_sized_by_the_users(caplog):
    groups = np.array([0, 1, 1, 2])
    with caplog.at_level(logging.WARNING):
        values = per_user({0: 1.0, 1: 2.0, 2: 3.0, 2_000_000_000: 9.0}, groups, 4, "cost")  # no 2e9-entry table
    np.testing.assert_array_equal(values, [1.0, 2.0, 2.0, 3.0])
    assert "cost gives a value to segment(s) [2000000000], which no user is in; ignored" in caplog.text
    with pytest.raises(ConfigError, match=r"value must be a number in \[0, 1e\+12\]"):
        per_user(1e308, None, 3, "value")
    with pytest.raises(ConfigError, match=r"budget must be a number in \[0, 1e\+12\]"):
        plan_contacts(np.full(3, 0.5), 1.0, 0.1, 1e300)
    plan = plan_contacts(np.full(4, 0.5), 1e12, 1.0, 10.0, groups=groups, caps={1: 1, 2_000_000_000: 3})
    assert len(plan.selected) == 3 and np.isfinite(plan.expected_revenue)


def test_summaries_are_standard_json():
    text = summary_json({"profit": float("inf"), "rates": [np.float64("nan"), np.float32(0.5)], "n": np.int64(3)})
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict == {"profit": None, "rates": [None, 0.5], "n": 3}


def test_a_control_group_that_leaves_nobody_to_contact_is_refused(caplog):
    rows = np.arange(1000)
    scores = np.linspace(0, 1, 1000)
    with pytest.raises(ConfigError, match=r"control_frac=0.9999 holds out all 1000 selected users, so nobody would be contacted"):
        draw_control(rows, scores, 0.9999, seed=1)
    with caplog.at_level(logging.WARNING):
        hold = draw_control(rows, scores, 0.99, seed=1)
    assert (~hold.control).sum() == 10
    assert "into 10 to contact and 990 held out: with only 10 treated users (fewer than 30 per group)" in caplog.text
    assert "lower control_frac" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        draw_control(rows, scores, 0.1, seed=1)
    assert caplog.text == ""


def test_the_uplift_rules_cover_every_option_of_the_model():
    from dmp_dl.campaign.uplift import UpliftOptions
    from dmp_dl.pipeline.checks import AUDIENCE_CLI_RULES

    checked = {k.removeprefix("uplift.") for k in AUDIENCE_CLI_RULES["uplift"] if k.startswith("uplift.")}
    assert checked == set(UpliftOptions.__dataclass_fields__)
    with pytest.raises(ConfigError, match=r"uplift: unknown key\(s\) \['layers'\]"):
        run_task(cli_cfg("task=uplift", "artifacts=/not/read", "+uplift.layers=3"))
