"""Embedded engines for the data stage: the core of cleaning on DuckDB and on Polars' streaming engine.

What is timed is the part of ``InteractionDataModule.prepare()`` an engine would take over on a hive
Parquet dataset written by ``bench/scale.py --data-stage --large`` (``--large-dir``):

1. read ``user_id, item_id, timestamp, event_type, value``; drop rows without a user, an item or a time;
2. the user and item vocabularies (distinct ids, sorted) and every event's codes into them;
3. exact duplicates dropped;
4. the events in time order, fetched as NumPy arrays (codes int32, times int64, values float64).

It is a subset of what the package's in-memory path does in its ``load``, ``clean`` and
``vocabularies`` steps (those also parse text times and values, check ranges, keep the first of
each duplicate in log order, count every drop by reason and build the quality report), so it is a
lower bound on an engine's cost and a like-for-like measure of the memory it needs. Compare it with
the same steps of ``python bench/scale.py --data-stage --large`` in the same RESULTS.md.

* ``duckdb``: ids coded first (one ``DISTINCT`` per id column), then every step on integers, under
  ``SET memory_limit`` (``--memory-limits``; it spills to ``--spill-dir`` beyond it), 2 threads or
  ``--threads``.
* ``duckdb-log-order``: the same with the in-memory path's order rules: the first of each set of
  duplicates in log order (file, then row) is kept and events of one time stay in log order (each
  event carries its file and row number through the duplicates and into the time sort).
* ``polars``: one lazy query (``scan_parquet`` ... ``unique`` ... ``rank("dense")`` ... ``sort``)
  collected by the streaming engine, ``POLARS_MAX_THREADS`` = ``--threads``.

Each run is a child process (its peak RSS, ``VmHWM``, is its own). Needs ``duckdb`` and ``polars``
(the ``bench`` extra)::

    python bench/scale.py --data-stage --large --large-dir /data/large   # writes the datasets once
    python bench/engines.py --large-dir /data/large --write-results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import output  # noqa: E402

ENGINES = {"duckdb": "duckdb", "duckdb-log-order": "duckdb", "polars": "polars"}  # engine -> its package


def run_duckdb(events: str, memory_limit: str, threads: int, spill_dir: str, log_order: bool = False) -> dict:
    """The core on DuckDB, ids coded first; ``log_order``: with the in-memory path's order rules (of each
    set of duplicates the first in log order, file then row, is kept; events of one time stay in log order)."""
    import duckdb

    t0 = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_limit}'; SET threads={threads}; SET temp_directory='{spill_dir}'; "
                "SET preserve_insertion_order=false")
    src = f"read_parquet('{events}/*/*.parquet', hive_partitioning=false{', filename=true, file_row_number=true' * log_order})"
    vocabularies = [("user_id", "u", "INTEGER"), ("item_id", "i", "INTEGER"), *([("filename", "f", "BIGINT")] * log_order)]
    for column, code, kind in vocabularies:
        con.execute(f"CREATE TEMP TABLE v_{code} AS SELECT {column}, (row_number() OVER (ORDER BY {column}) - 1)::{kind} "
                    f"AS {code} FROM (SELECT DISTINCT {column} FROM {src} WHERE {column} IS NOT NULL)")
    con.execute(f"CREATE TEMP TABLE v_t AS SELECT t, (row_number() OVER (ORDER BY t) - 1)::TINYINT AS k "
                f"FROM (SELECT DISTINCT lower(trim(event_type)) AS t FROM {src})")
    t1 = time.perf_counter()
    joins = " ".join(f"JOIN v_{code} USING ({column})" for column, code, _ in vocabularies)
    position = ", (f << 40) + file_row_number AS pos" if log_order else ""
    con.execute(f"CREATE TEMP TABLE ev AS SELECT u, i, timestamp, k, value{position} FROM {src} s {joins} "
                "JOIN v_t ON v_t.t = lower(trim(s.event_type)) WHERE timestamp IS NOT NULL")
    t2 = time.perf_counter()
    distinct = ("(SELECT u, i, timestamp, k, value, min(pos) AS first FROM ev GROUP BY ALL) ORDER BY timestamp, first"
                if log_order else "(SELECT DISTINCT * FROM ev) ORDER BY timestamp")
    out = con.sql(f"SELECT u, i, timestamp, k, value FROM {distinct}").fetchnumpy()
    t3 = time.perf_counter()
    return {"rows_out": int(len(out["u"])), "users": int(out["u"].max()) + 1, "items": int(out["i"].max()) + 1,
            "steps": {"vocabularies": t1 - t0, "coded": t2 - t1, "dedupe_order_fetch": t3 - t2}, "seconds": t3 - t0}


def run_polars(events: str) -> dict:
    import polars as pl

    t0 = time.perf_counter()
    ids = ["user_id", "item_id"]
    lf = (pl.scan_parquet(f"{events}/*/*.parquet", hive_partitioning=False).with_row_index("row")
          .with_columns(pl.col("event_type").str.strip_chars().str.to_lowercase())
          .filter(pl.all_horizontal([pl.col(c).is_not_null() & (pl.col(c).str.strip_chars() != "") for c in ids])
                  & pl.col("timestamp").is_not_null())
          .unique(subset=[*ids, "timestamp", "event_type", "value"], keep="first", maintain_order=False)
          .with_columns(*[(pl.col(c).rank("dense").cast(pl.Int32) - 1) for c in ids])
          .sort(["timestamp", "row"]))
    df = lf.collect(engine="streaming")
    out = {c: df[c].to_numpy() for c in (*ids, "timestamp", "value")}
    return {"rows_out": int(len(df)), "users": int(out["user_id"].max()) + 1, "items": int(out["item_id"].max()) + 1,
            "steps": {}, "seconds": time.perf_counter() - t0}


def child(args) -> None:
    if args.child.startswith("duckdb"):
        result = run_duckdb(args.events, args.memory_limit, args.threads, args.spill_dir, args.child == "duckdb-log-order")
    else:
        result = run_polars(args.events)
    result["peak_rss_mib"] = common.peak_rss_mib()
    Path(args.child_out).write_text(json.dumps(result))


def measure(engine: str, events: Path, args, memory_limit: str | None = None) -> dict:
    out = Path(args.spill_dir) / f"{engine}-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "--child", engine, "--events", str(events), "--child-out", str(out),
           "--threads", str(args.threads), "--spill-dir", args.spill_dir]
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    env = dict(os.environ, POLARS_MAX_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-dir", default=None, help="the folder of bench/scale.py --data-stage --large's datasets")
    ap.add_argument("--large-events", type=int, nargs="+", default=[5_000_000, 20_000_000, 50_000_000])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--memory-limits", nargs="+", default=["4GB", "1GB"], help="DuckDB's memory_limit, one run each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spill-dir", default="/tmp/dmp-bench-engines")
    output.add_arguments(ap)
    ap.add_argument("--child", choices=list(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--events", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--memory-limit", default="4GB", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    Path(args.spill_dir).mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return {}
    output.require({ENGINES[name]: f"the {name} runs" for name in args.engines}, "bench/engines.py",
                   "or name the engines installed with --engines")
    output.use(args)
    if not args.large_dir:
        ap.error("--large-dir is needed (the datasets of bench/scale.py --data-stage --large)")
    rows, data = [], {"runs": []}
    for n in args.large_events:
        events = Path(args.large_dir) / f"hive-{n}" / "events"
        if not events.is_dir():
            print(f"[engines] {events}: missing (write it with bench/scale.py --data-stage --large)", flush=True)
            continue
        runs = [(e, lim) for e in args.engines for lim in (args.memory_limits if e.startswith("duckdb") else [None])]
        for engine, limit in runs:
            result = {"events": n, "engine": engine, "memory_limit": limit, **measure(engine, events, args, limit)}
            data["runs"].append(result)
            print(f"[engines] {n:,} {engine} {limit or ''}: {result['seconds']:.1f} s, peak {result['peak_rss_mib']:,.0f} MiB",
                  flush=True)
            rows.append({"events": f"{n:,}", "engine": engine + (f" (memory_limit {limit})" if limit else ""),
                         "rows out": f"{result['rows_out']:,}", "seconds": f"{result['seconds']:.1f}",
                         "peak RSS MiB": f"{result['peak_rss_mib']:,.0f}"})
    body = [
        "The core of the data stage (read, drop rows without ids or time, vocabularies and codes, exact duplicates, "
        "time order, NumPy arrays out) on a hive Parquet dataset of `bench/scale.py --data-stage --large`, "
        f"{args.threads} threads, each run a child process. A subset of the in-memory path's `load` + `clean` + "
        "`vocabularies` steps (see the module docstring): compare with the \"Data stage at scale\" section.",
        "",
        common.markdown_table(rows, ["events", "engine", "rows out", "seconds", "peak RSS MiB"]),
    ]
    versions = {}
    for package in sorted({ENGINES[name] for name in args.engines}):
        versions[package] = __import__(package).__version__
    data["engine_versions"] = versions
    body.append("\nEngine versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    common.write_section("data_engines", "Embedded engines for the data stage (bench/engines.py)", "\n".join(body), data)
    return data


if __name__ == "__main__":
    main()
