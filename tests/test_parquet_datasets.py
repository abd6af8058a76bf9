"""Event logs as partitioned Parquet datasets (hive folders, globs), as Spark, Flink, Kafka Connect
or a warehouse export write them: the same cleaning, vocabularies, split and test metrics as the
same log in one CSV file; only the columns and rows cleaning keeps are read; and each kind of bad
dataset stops a run with one line naming the file and the column."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmp_dl.core.cli import report_errors
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.data.cleaning import CleaningOptions
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.event_files import EventFileSource
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.pipeline.checks import check_data_config
from dmp_dl.pipeline.run import run

from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}
DAY = 86400
END = pd.Timestamp("2026-01-01", tz="UTC").timestamp()


def dirty_log(n_users: int = 300, n_items: int = 100, n_events: int = 6000, days: int = 20) -> pd.DataFrame:
    """A synthetic log (by user, then time) plus rows each cleaning rule drops, at times inside the
    last week: repeated rows, a missing user, a missing item, an unknown type, an absurd value and a
    missing time."""
    events = SyntheticSource(n_users=n_users, n_items=n_items, n_events=n_events, days=days, seed=7).load().events
    events = events.astype({"timestamp": "Int64"})
    t = int(END - 3 * DAY)
    bad = pd.DataFrame({
        "user_id": [None, "u000001", "u000002", "u000003", "u000004"],
        "item_id": ["i00001", None, "i00002", "i00003", "i00004"],
        "timestamp": pd.array([t, t + 1, t + 2, t + 3, None], dtype="Int64"),
        "event_type": ["view", "view", "signup", "view", "click"],
        "value": [0.0, 0.0, 0.0, 1e300, 0.0],
    })
    return pd.concat([events, events.iloc[:40], bad], ignore_index=True)


def day_of(times: pd.Series) -> pd.Series:
    """``YYYY-MM-DD`` of epoch seconds (None where missing)."""
    stamps = pd.to_datetime(times.astype("float64"), unit="s", utc=True)
    return stamps.dt.strftime("%Y-%m-%d").where(stamps.notna(), None)


def write_hive(frame: pd.DataFrame, root: Path, by: pd.Series, key: str) -> Path:
    """``frame`` as ``root/key=VALUE/part-0.parquet`` folders (rows keep their order within a folder;
    a missing value goes where Spark puts it, ``__HIVE_DEFAULT_PARTITION__``)."""
    labels = by.fillna("__HIVE_DEFAULT_PARTITION__")
    for value, rows in frame.groupby(labels, sort=True):
        folder = root / f"{key}={value}"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), folder / "part-0.parquet")
    (root / "_SUCCESS").write_text("")  # what Spark leaves beside its output
    return root


@pytest.fixture
def logs(tmp_path) -> dict[str, Path]:
    frame = dirty_log()
    csv = tmp_path / "events.csv"
    frame.to_csv(csv, index=False)
    hive = write_hive(frame, tmp_path / "events", day_of(frame["timestamp"]), "date")
    return {"csv": csv, "hive": hive, "glob": hive / "**" / "part-*.parquet", "frame": frame}


def prepare(path: Path | str, **kwargs) -> InteractionDataModule:
    cleaning = {"event_weights": WEIGHTS, **kwargs.pop("cleaning", {})}
    return InteractionDataModule(EventFileSource, path=str(path), cleaning=cleaning, **kwargs).prepare()


def assert_same_data(a: InteractionDataModule, b: InteractionDataModule) -> None:
    """The same cleaning counts, vocabularies, clean events and split."""
    ra, rb = a.report.events, b.report.events
    assert (ra.rows_in, ra.rows_out, ra.dropped, ra.filled) == (rb.rows_in, rb.rows_out, rb.dropped, rb.filled)
    assert (a.report.n_users, a.report.n_items, a.report.events_per_type) == (b.report.n_users, b.report.n_items,
                                                                             b.report.events_per_type)
    assert a.report.time_range == b.report.time_range
    assert list(a.user_vocab.ids) == list(b.user_vocab.ids) and list(a.item_vocab.ids) == list(b.item_vocab.ids)
    assert a.split_method == b.split_method
    assert {k: v for k, v in a.report.split.items()} == {k: v for k, v in b.report.split.items()}
    pd.testing.assert_frame_equal(a.log_.events.reset_index(drop=True), b.log_.events.reset_index(drop=True))


# -- the same result as the CSV ---------------------------------------------------------------------


def test_a_hive_partitioned_log_cleans_and_splits_as_its_csv(logs):
    csv = prepare(logs["csv"])
    dropped = csv.report.events.dropped
    assert {"duplicate", "missing_user_id", "missing_item_id", "unknown_event_type", "bad_value",
            "bad_timestamp"} <= set(dropped), dropped  # the log exercises every rule it should
    for form in ("hive", "glob"):
        parquet = prepare(logs[form])
        assert_same_data(csv, parquet)
        sources = parquet.report.events.sources  # one entry per partition file, rows in and out of each
        assert len(sources) == len(list(logs["hive"].glob("date=*/part-0.parquet")))
        assert sum(s["rows_in"] for s in sources.values()) == parquet.report.events.rows_in
        assert sum(s["rows_out"] for s in sources.values()) == parquet.report.events.rows_out
        assert "date" in parquet.report.events.ignored_columns  # the partition, not used by cleaning


def test_ids_are_read_as_codes_block_by_block_and_clean_as_the_csv(logs, monkeypatch):
    """Text columns are dictionary-encoded while the dataset is read, a block of rows at a time
    (each block its own dictionary, unified at the end): each id's text is held once, not once per
    event, and the result is the CSV's."""
    import dmp_dl.data.parquet_dataset as parquet_dataset

    monkeypatch.setattr(parquet_dataset, "CODED_ROWS", 500)  # many blocks, dictionaries that differ
    raw = EventFileSource(path=str(logs["hive"])).load().events
    frame = logs["frame"]
    for column in ("user_id", "item_id", "event_type"):
        assert isinstance(raw[column].dtype, pd.CategoricalDtype), column
        assert len(raw[column].cat.categories) == frame[column].nunique()
        read = sorted(raw[column].astype(object).where(raw[column].notna(), None), key=str)
        assert read == sorted(frame[column].astype(object).where(frame[column].notna(), None), key=str)
    assert_same_data(prepare(logs["csv"]), prepare(logs["hive"]))


def test_a_time_window_reads_only_the_rows_it_keeps(logs):
    window = {"min_timestamp": "2025-12-20", "max_timestamp": "2025-12-31T12:00:00"}
    csv = prepare(logs["csv"], cleaning=window)
    parquet = prepare(logs["hive"], cleaning=window)
    assert_same_data(csv, parquet)
    out_of_range = csv.report.events.dropped["timestamp_out_of_range"]
    raw = EventFileSource(path=str(logs["hive"])).load(CleaningOptions(event_weights=WEIGHTS, **window))
    # the rows outside the window were never read: counted, not loaded
    assert raw.meta["unread_rows"] == {"timestamp_out_of_range": out_of_range}
    assert len(raw.events) == len(logs["frame"]) - out_of_range
    days = {name.split("date=")[1][:10]: (n, unread) for name, n, _, unread in raw.meta["sources"]}
    before = {day for day in days if day < "2025-12-19"}
    assert before and all(days[day][0] == 0 for day in before)  # whole days before the window: not one row read
    assert days["2025-12-25"] == (days["2025-12-25"][0], 0)  # a day inside it: read in full


def test_a_time_partition_is_the_time_column_and_prunes_whole_folders(tmp_path, logs):
    frame = logs["frame"].assign(date=day_of(logs["frame"]["timestamp"])).drop(columns=["timestamp"])
    frame.to_csv(tmp_path / "daily.csv", index=False)
    hive = write_hive(frame.drop(columns=["date"]), tmp_path / "daily", frame["date"], "date")
    columns, window = {"timestamp": "date"}, {"min_timestamp": "2025-12-25"}
    csv = InteractionDataModule(EventFileSource(path=str(tmp_path / "daily.csv"), columns=columns),
                                cleaning={"event_weights": WEIGHTS, **window}).prepare()
    parquet = InteractionDataModule(EventFileSource(path=str(hive), columns=columns),
                                    cleaning={"event_weights": WEIGHTS, **window}).prepare()
    assert_same_data(csv, parquet)
    assert csv.report.events.dropped["timestamp_out_of_range"] > 0
    raw = EventFileSource(path=str(hive), columns=columns).load(CleaningOptions(event_weights=WEIGHTS, **window))
    read_days = {name.split("date=")[1][:10] for name, n, _, _ in raw.meta["sources"] if n > 0}
    assert read_days and min(d for d in read_days if d[0].isdigit()) >= "2025-12-25"


def test_a_placeholder_time_in_every_row_is_no_time_as_from_a_csv(tmp_path):
    """Every row at time 0 lies outside the window: the dataset is read in full after all, and the
    log counts as having no times, as the same CSV does (not as every row out of range)."""
    frame = pd.DataFrame({"user_id": np.repeat([f"u{i}" for i in range(40)], 5), "item_id": [f"i{i % 17}" for i in range(200)],
                          "timestamp": 0})
    frame.to_csv(tmp_path / "zero.csv", index=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "zero.parquet")
    csv, parquet = prepare(tmp_path / "zero.csv"), prepare(tmp_path / "zero.parquet")
    assert not parquet.report.has_timestamps and parquet.report.events.rows_out == 200
    assert_same_data(csv, parquet)


def test_a_partition_may_be_the_event_type(tmp_path, logs):
    frame = logs["frame"]
    parquet = prepare(write_hive(frame.drop(columns=["event_type"]), tmp_path / "by_type", frame["event_type"], "event_type"))
    csv = prepare(logs["csv"])
    assert parquet.report.events.dropped == csv.report.events.dropped
    assert parquet.report.events_per_type == csv.report.events_per_type
    assert list(parquet.user_vocab.ids) == list(csv.user_vocab.ids)


def test_only_the_columns_cleaning_uses_are_read(tmp_path):
    """A column of other types in other files is no error when cleaning does not use it; it is listed
    as ignored."""
    root = tmp_path / "logs"
    root.mkdir()
    rows = {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "timestamp": [1_700_000_000, 1_700_000_100]}
    pq.write_table(pa.table({**rows, "payload": [1, 2]}), root / "a.parquet")
    pq.write_table(pa.table({**rows, "payload": pa.array([{"x": 1}, {"x": 2}])}), root / "b.parquet")
    dm = InteractionDataModule(EventFileSource, path=str(root), split={"method": "random_per_user"}).prepare()
    assert dm.report.events.rows_out == 2  # the repeats of b are duplicates of a
    assert "payload" in dm.report.events.ignored_columns
    raw = EventFileSource(path=str(root)).load()
    assert list(raw.events.columns) == ["user_id", "item_id", "timestamp"]


def test_a_tiny_training_run_gives_the_same_test_metrics_from_csv_and_parquet(tmp_path):
    sizes = dict(item.removeprefix("data.source.").split("=") for item in TINY_DATA if item.startswith("data.source."))
    log = SyntheticSource(n_users=int(sizes["n_users"]), n_items=int(sizes["n_items"]),
                          n_events=int(sizes["n_events"]), n_categories=int(sizes["n_categories"]),
                          n_segments=int(sizes["n_segments"]), seed=3).load().events
    log.to_csv(tmp_path / "events.csv", index=False)
    write_hive(log, tmp_path / "events", day_of(log["timestamp"]), "date")
    fast = [*QUIET_TRAINER, "debug=fdr", "logger=none", "propensity.enabled=false", "audience.enabled=false",
            "evaluation.report=null", "data.batch_size=512"]
    metrics = {}
    for name, path in (("csv", tmp_path / "events.csv"), ("parquet", tmp_path / "events" / "**" / "*.parquet")):
        out = tmp_path / name
        run(compose_cfg(["data=events", f"data.path={path}", *fast], out))
        metrics[name] = json.loads((out / "metrics.json").read_text())
    ranking = {name: {model: {k: v for k, v in m.items() if "seconds" not in k} for model, m in got["ranking"].items()}
               for name, got in metrics.items()}
    assert any("recall@20" in m for m in ranking["csv"].values()), ranking["csv"]
    assert ranking["csv"] == ranking["parquet"]
    assert metrics["csv"]["model"]["selected"] == metrics["parquet"]["model"]["selected"]


def test_the_checks_before_a_run_accept_a_folder_and_a_glob_of_events(logs, tmp_path):
    for path in (logs["hive"], logs["glob"]):
        check_data_config(compose_cfg(["data=events", f"data.path={path}"], tmp_path / "run"))
    with pytest.raises(DataError, match="matches no file"):
        check_data_config(compose_cfg(["data=events", f"data.path={tmp_path / 'nothing' / '*.parquet'}"], tmp_path / "r"))


# -- mixed schemas --------------------------------------------------------------------------------


def test_an_id_column_int_in_one_file_and_text_in_another_is_read_as_text(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": ["i1", "i2"], "timestamp": [1_700_000_000, 1_700_000_001],
                             "value": [1, 2]}), root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["1", "u3"], "item_id": ["i3", "i4"], "timestamp": [1_700_000_002, 1_700_000_003],
                             "value": [0.5, 1.5]}), root / "b.parquet")
    pd.DataFrame({"user_id": ["1", "2", "1", "u3"], "item_id": ["i1", "i2", "i3", "i4"],
                  "timestamp": [1_700_000_000, 1_700_000_001, 1_700_000_002, 1_700_000_003],
                  "value": [1, 2, 0.5, 1.5]}).to_csv(tmp_path / "same.csv", index=False)
    split = {"method": "random_per_user"}
    parquet = InteractionDataModule(EventFileSource, path=str(root), split=split).prepare()
    csv = InteractionDataModule(EventFileSource, path=str(tmp_path / "same.csv"), split=split).prepare()
    assert list(parquet.user_vocab.ids) == ["1", "2", "u3"]
    pd.testing.assert_frame_equal(parquet.log_.events, csv.log_.events)


def test_naive_and_zoned_timestamps_in_different_files_are_one_time_column(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    moment = pd.Timestamp("2023-11-14 22:13:20")
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"],
                             "timestamp": pa.array([moment.to_pydatetime()], pa.timestamp("us"))}), root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u2"], "item_id": ["i2"],
                             "timestamp": pa.array([moment.tz_localize("UTC").to_pydatetime()], pa.timestamp("ms", "UTC"))}),
                   root / "b.parquet")
    clean = InteractionDataModule(EventFileSource, path=str(root), split={"method": "random_per_user"}).prepare().log_.events
    assert clean["timestamp"].tolist() == [1_700_000_000, 1_700_000_000]


def _exit_line(capsys, fn) -> str:
    """The one ``error:`` line a command prints for ``fn``'s error, with exit status 2."""
    with pytest.raises(SystemExit) as exit_info, report_errors():
        fn()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _train(tmp_path: Path, path: Path | str):
    return lambda: run(compose_cfg(["data=events", f"data.path={path}", *QUIET_TRAINER, "logger=none"], tmp_path / "run"))


def test_a_column_whose_types_cannot_be_joined_is_refused_naming_both_files(tmp_path, capsys):
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"],
                             "timestamp": pa.array([pd.Timestamp("2023-11-14").to_pydatetime()], pa.timestamp("us"))}),
                   root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u2"], "item_id": ["i2"], "timestamp": ["yesterday"]}), root / "b.parquet")
    line = _exit_line(capsys, _train(tmp_path, root))
    assert "'timestamp'" in line and str(root / "a.parquet") in line and str(root / "b.parquet") in line
    assert "write it with one type in every file" in line


def test_float_ids_beside_text_ids_are_refused(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"user_id": [1.5], "item_id": ["i1"]}), root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u2"], "item_id": ["i2"]}), root / "b.parquet")
    with pytest.raises(DataError, match=r"column 'user_id' is double in .*a\.parquet and string in .*b\.parquet"):
        EventFileSource(path=str(root)).load()


# -- bad datasets: one line naming the file and what to do ------------------------------------------


def test_a_corrupt_parquet_file_in_a_dataset_is_named(tmp_path, capsys, logs):
    victim = sorted(logs["hive"].glob("date=*/part-0.parquet"))[3]
    victim.write_bytes(b"PAR1 not really parquet PAR1")
    line = _exit_line(capsys, _train(tmp_path, logs["hive"]))
    assert f"error: {victim}: cannot read as Parquet" in line and "replace or remove the file" in line


def test_a_damaged_page_behind_an_intact_footer_is_named(tmp_path, logs):
    victim = sorted(logs["hive"].glob("date=*/part-0.parquet"))[5]
    data = bytearray(victim.read_bytes())
    for i in range(8, min(len(data) // 2, 600)):  # the first data pages; the footer at the end is left intact
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{victim}: cannot read as Parquet"):
        prepare(logs["hive"])


def test_a_partition_folder_that_is_also_a_column_is_refused_naming_it(tmp_path, capsys):
    root = tmp_path / "logs"
    (root / "event_type=click").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"]}),
                   root / "event_type=click" / "part-0.parquet")
    line = _exit_line(capsys, _train(tmp_path, root))
    assert "'event_type' is both a column of the file and a partition folder" in line
    assert str(root / "event_type=click" / "part-0.parquet") in line


def test_a_glob_that_matches_nothing_stops_train_py_with_one_line(tmp_path):
    pattern = tmp_path / "logs" / "**" / "part-*.parquet"
    done = subprocess.run([sys.executable, "train.py", "data=events", f"data.path={pattern}", "logger=none",
                           f"paths.output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: data.path={pattern} matches no file; check the pattern (** spans folders, e.g. "
                     f"{tmp_path / 'logs' / '**' / '*.parquet'}) or set data.path to a file or folder"]
    assert "Traceback" not in done.stdout + done.stderr


def test_a_folder_mixing_csv_and_parquet_is_refused(tmp_path, capsys):
    root = tmp_path / "logs"
    root.mkdir()
    pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"]}).to_csv(root / "a.csv", index=False)
    pq.write_table(pa.table({"user_id": ["u2"], "item_id": ["i2"]}), root / "b.parquet")
    line = _exit_line(capsys, _train(tmp_path, root))
    assert "mixes CSV and Parquet files" in line and str(root / "a.csv") in line and str(root / "b.parquet") in line


def test_a_file_lacking_a_required_column_is_named(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"]}), root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u2"], "sku": ["i2"]}), root / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: events file lacks required column 'item_id'"):
        EventFileSource(path=str(root)).load()


def test_a_csv_dataset_in_partition_folders_gets_its_partition_columns(tmp_path, logs):
    frame = logs["frame"]
    root = tmp_path / "csv_by_type"
    for value, rows in frame.groupby(frame["event_type"]):
        (root / f"event_type={value}").mkdir(parents=True)
        rows.drop(columns=["event_type"]).to_csv(root / f"event_type={value}" / "part-0.csv", index=False)
    by_folder = prepare(root)
    assert by_folder.report.events_per_type == prepare(logs["csv"]).report.events_per_type
    assert np.isin(list(by_folder.report.events_per_type), list(WEIGHTS)).all()


def test_a_log_too_large_for_the_memory_free_is_refused_in_one_line_before_it_is_read(tmp_path, capsys, logs,
                                                                                     monkeypatch):
    from dmp_dl.data import parquet_dataset

    rows = len(logs["frame"])
    window = {"min_timestamp": "2025-12-30"}
    kept = len(prepare(logs["hive"], cleaning=window).log_.events)
    # room for the events of the last days, not for the whole log (the check leaves the fixed part out)
    free = (rows // 4) * parquet_dataset.PREPARE_BYTES_PER_EVENT
    assert kept < rows // 4
    monkeypatch.setattr(parquet_dataset, "host_available_bytes", lambda: free)
    scanned = []
    monkeypatch.setattr(parquet_dataset, "_scan", lambda *a, **k: scanned.append(1) or pytest.fail("read anyway"))
    line = _exit_line(capsys, _train(tmp_path, logs["hive"]))
    assert str(logs["hive"]) in line and f"{rows:,} events" in line and "data.cleaning.min_timestamp" in line
    assert not scanned
    monkeypatch.undo()
    monkeypatch.setattr(parquet_dataset, "host_available_bytes", lambda: free)
    assert len(prepare(logs["hive"], cleaning=window).log_.events) == kept  # a window that fits is read


def test_a_csv_log_too_large_for_the_memory_free_is_refused_in_one_line_before_it_is_read(tmp_path, capsys, logs,
                                                                                         monkeypatch):
    from dmp_dl.data import event_files, memory_check

    text = logs["csv"].stat().st_size
    rows = memory_check.csv_rows_estimate(logs["csv"])  # the dirty log is longer than the sampled head
    assert rows == pytest.approx(len(logs["frame"]), rel=0.01)
    folder = tmp_path / "csv-folder"
    folder.mkdir()
    for part in range(2):
        (folder / f"part-{part}.csv").write_bytes(logs["csv"].read_bytes())
    need = rows * memory_check.PREPARE_BYTES_PER_EVENT + text
    read = []
    monkeypatch.setattr(event_files, "read_table", lambda *a, **k: read.append(1) or pytest.fail("read anyway"))
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: need - 1)
    line = _exit_line(capsys, _train(tmp_path, logs["csv"]))
    assert str(logs["csv"]) in line and f"{rows:,} events" in line and "Parquet" in line
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: need * 2 - 1)  # one file fits, two do not
    line = _exit_line(capsys, _train(tmp_path / "folder", folder))
    assert str(folder) in line and f"{2 * rows:,} events" in line
    assert not read
    monkeypatch.undo()
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: need)
    assert prepare(logs["csv"]).report.events.rows_in == len(logs["frame"])  # a log that fits is read


def test_data_memory_limit_gb_caps_what_the_data_stage_plans_on(tmp_path, capsys, logs):
    """On a machine with memory to spare, the user's own limit refuses a log that needs more, naming the
    setting, and a limit that leaves room reads the same log."""
    from dmp_dl.data import memory_check, parquet_dataset

    rows = len(logs["frame"])
    need_gb = rows * parquet_dataset.PREPARE_BYTES_PER_EVENT / 2**30
    limit = f"data.memory_limit_gb={need_gb / 2:.8f}"

    def cfg(path, run_dir):
        return compose_cfg(["data=events", f"data.path={path}", limit, *QUIET_TRAINER, "logger=none"], run_dir)

    line = _exit_line(capsys, lambda: run(cfg(logs["hive"], tmp_path / "run")))
    assert str(logs["hive"]) in line and f"{rows:,} events" in line and "data.memory_limit_gb=" in line, line
    csv_need_gb = (memory_check.csv_rows_estimate(logs["csv"]) * memory_check.PREPARE_BYTES_PER_EVENT
                   + logs["csv"].stat().st_size) / 2**30
    limit = f"data.memory_limit_gb={csv_need_gb / 2:.8f}"
    line = _exit_line(capsys, lambda: run(cfg(logs["csv"], tmp_path / "run-csv")))
    assert str(logs["csv"]) in line and "data.memory_limit_gb=" in line and "allows" in line, line
    kept = prepare(logs["hive"], memory_limit_gb=2 * need_gb + 0.001)
    assert kept.report.events.rows_in == rows


def test_a_log_that_fits_only_without_the_fixed_part_is_read_after_one_warning(logs, monkeypatch, caplog):
    """Between the floor estimate and the floor plus the fixed part the run goes on, but says first that
    the system may stop it: the line a user sees before a kill by the kernel. Not under the user's own
    data.memory_limit_gb (a plan), nor with room to spare."""
    from dmp_dl.data import memory_check, parquet_dataset

    rows = len(logs["frame"])
    need = rows * parquet_dataset.PREPARE_BYTES_PER_EVENT
    tight = need + memory_check.PREPARE_FIXED_BYTES // 2
    csv_need = memory_check.csv_rows_estimate(logs["csv"]) * memory_check.PREPARE_BYTES_PER_EVENT + logs["csv"].stat().st_size
    for path, module, floor in ((logs["hive"], parquet_dataset, need), (logs["csv"], memory_check, csv_need)):
        for free, warned in ((floor + memory_check.PREPARE_FIXED_BYTES // 2, True),
                             (floor + memory_check.PREPARE_FIXED_BYTES, False)):
            monkeypatch.setattr(module, "host_available_bytes", lambda free=free: free)
            caplog.clear()
            with caplog.at_level("WARNING", logger="dmp_dl.data.memory_check"):
                assert prepare(path).report.events.rows_in == rows
            lines = [r.getMessage() for r in caplog.records if "may stop the run" in r.getMessage()]
            assert len(lines) == (1 if warned else 0), (path, free, lines)
            if warned:
                assert str(path) in lines[0] and "is free to this process" in lines[0]
    monkeypatch.undo()  # this machine's memory, and the same room as a plan of the user's
    caplog.clear()
    with caplog.at_level("WARNING", logger="dmp_dl.data.memory_check"):
        assert prepare(logs["hive"], memory_limit_gb=tight / 2**30).report.events.rows_in == rows
    assert "may stop the run" not in caplog.text


@pytest.mark.parametrize("limit", [0, -1, "lots", float("inf")])
def test_a_data_memory_limit_that_is_no_positive_number_is_refused(limit, logs):
    with pytest.raises(ConfigError, match="data.memory_limit_gb must be a positive number"):
        prepare(logs["hive"], memory_limit_gb=limit)


def test_the_rows_of_a_csv_are_counted_within_its_head_and_estimated_from_its_size_beyond(tmp_path):
    from dmp_dl.data.memory_check import CSV_SAMPLE_BYTES, csv_rows_estimate

    short = tmp_path / "short.csv"
    short.write_text("user_id,item_id\nu1,i1\nu2,i2")  # within the head, the last line without a break
    assert csv_rows_estimate(short) == 2
    path = tmp_path / "long.csv"
    rng = np.random.default_rng(0)
    lines = [f"u{rng.integers(10**6)},i{rng.integers(10**4)},{1700000000 + i}" for i in range(20_000)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    assert path.stat().st_size > 4 * CSV_SAMPLE_BYTES
    assert csv_rows_estimate(path) == pytest.approx(20_000, rel=0.05)
