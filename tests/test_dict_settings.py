"""Dict settings whose keys are the user's (column renames, event weights) take new keys on the
command line in the documented form, parsed by Hydra exactly as a command parses them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dmp_dl import Recommender
from dmp_dl.campaign.outcomes import read_outcomes
from dmp_dl.core.errors import DataError
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.pipeline.run import load_data, run

from .conftest import CONF_DIR, QUIET_TRAINER, compose_cfg

RENAMED = "data.source.columns={user_id: userId, item_id: movieId, value: rating}"


@pytest.mark.parametrize("data, override, key, expected", [
    ("events", RENAMED, "data.source.columns", {"user_id": "userId", "item_id": "movieId", "value": "rating"}),
    ("events", "data.source.columns.user_id=customer_id", "data.source.columns", {"user_id": "customer_id"}),
    ("events", "+data.source.columns={user_id: customer_id}", "data.source.columns", {"user_id": "customer_id"}),
    ("events", "data.cleaning.event_weights.signup=1.0", "data.cleaning.event_weights",
     {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "interaction": 1.0, "signup": 1.0}),
    ("events", "data.cleaning.event_weights={signup: 2.0, view: 0.5}", "data.cleaning.event_weights",
     {"view": 0.5, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "interaction": 1.0, "signup": 2.0}),
    ("synthetic", "data.cleaning.event_weights.signup=1.0", "data.cleaning.event_weights",
     {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "signup": 1.0}),
    ("movielens", "data.cleaning.event_weights={review: 2.0}", "data.cleaning.event_weights", {"rating": 1.0, "review": 2.0}),
])
def test_dict_settings_take_new_keys_without_a_plus(tmp_path, data, override, key, expected):
    path = [] if data == "synthetic" else ["data.path=somewhere"]
    cfg = compose_cfg([f"data={data}", *path, override], tmp_path)
    assert OmegaConf.to_container(OmegaConf.select(cfg, key)) == expected


def test_a_dict_setting_is_replaced_with_delete_then_add(tmp_path):
    cfg = compose_cfg(["data=events", "data.path=x", "~data.cleaning.event_weights", "+data.cleaning.event_weights={signup: 1.0}"],
                      tmp_path)
    assert OmegaConf.to_container(cfg.data.cleaning.event_weights) == {"signup": 1.0}


@pytest.mark.parametrize("override", ["data.source.n_userz=3", "data.cleaning.min_valu=4", "data.split.methd=auto"])
def test_a_misspelt_ordinary_setting_is_still_refused(tmp_path, override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose_cfg([override], tmp_path)


@pytest.mark.parametrize("override", ["outcome_columns={user_id: uid, timestamp: ts}", "outcome_columns.user_id=uid"])
def test_outcome_columns_take_new_keys_without_a_plus(tmp_path, override):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("audience_cli", overrides=["task=measure", override])
    assert OmegaConf.to_container(cfg.outcome_columns)["user_id"] == "uid"


def ratings_with_movielens_names(path: Path) -> Path:
    """A rating log as MovieLens names its columns: userId, movieId, rating, timestamp."""
    log = SyntheticSource(n_users=300, n_items=150, n_events=9000, days=60, seed=3).load().events
    log = log[["user_id", "item_id", "value", "timestamp"]].rename(
        columns={"user_id": "userId", "item_id": "movieId", "value": "rating"})
    log.to_csv(path, index=False)
    return path


def test_the_loaders_suggestion_is_a_working_override(tmp_path):
    """The missing-column message names an override that, with the real column filled in, loads the file."""
    ratings = ratings_with_movielens_names(tmp_path / "ratings.csv")
    cfg = compose_cfg(["data=events", f"data.path={ratings}"], tmp_path / "a")
    with pytest.raises(DataError) as refused:
        load_data(cfg)
    suggestion = re.search(r"'(data\.source\.columns=\{user_id: YOUR_COLUMN\})'", str(refused.value))
    assert suggestion, str(refused.value)
    fixed = suggestion.group(1).replace("YOUR_COLUMN", "userId")
    cfg = compose_cfg(["data=events", f"data.path={ratings}", fixed, "data.source.columns.item_id=movieId"], tmp_path / "b")
    dm = load_data(cfg)
    assert dm.report.events.rows_out > 0


def test_a_run_on_renamed_columns_trains_and_serves_their_ids(tmp_path):
    ratings = ratings_with_movielens_names(tmp_path / "ratings.csv")
    cfg = compose_cfg(["data=events", f"data.path={ratings}", RENAMED, *QUIET_TRAINER, "debug=fdr", "logger=none"],
                      tmp_path / "run")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    quality = json.loads((out / "data_quality.json").read_text())
    assert quality["events"]["rows_in"] == 9000 and quality["events"]["rows_out"] > 0
    user = str(pd.read_csv(ratings, usecols=["userId"]).userId.iloc[0])
    assert Recommender.load(out / "artifacts").recommend(user, k=3)


def test_outcome_file_messages_name_the_outcome_settings(tmp_path):
    outcomes = tmp_path / "outcomes.csv"
    pd.DataFrame({"uid": ["1", "2"], "timestamp": [1_700_000_000, 1_700_000_100]}).to_csv(outcomes, index=False)
    with pytest.raises(DataError, match=r"'outcome_columns=\{user_id: YOUR_COLUMN\}'") as refused:
        read_outcomes(str(outcomes))
    assert "data.source" not in str(refused.value)
    with pytest.raises(DataError, match=r"fix outcome_columns \(canonical name") as refused:
        read_outcomes(str(outcomes), columns={"user_id": "customer"})
    assert "data.source" not in str(refused.value)
    with pytest.raises(DataError, match=r"is outcome_sep right\?"):
        read_outcomes(str(outcomes), sep=";")
