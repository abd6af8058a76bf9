"""The bad-input corpus: malformed files for the loaders, bad requests for the HTTP API.

Every case must end in a clear error (a :class:`DmpError` naming the file or parameter; over
HTTP a 4xx with a JSON ``detail``) or in rows dropped and counted in the data-quality report.
Any other exception, and any 5xx, fails the case. Hypothesis adds generated CSV files, byte
strings, DataFrames and request bodies on top of the hand-written cases.

The suite counts what it tried: at the end of the module it prints the number of hand-written
cases and generated examples, and writes them as JSON to ``$DMP_BAD_INPUTS_REPORT`` when set
(``bench/reliability.py`` reads it for ``bench/RESULTS.md``).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmp_dl.api.http_errors import ErrorBody
from dmp_dl.api.server import create_app
from dmp_dl.core.errors import ConfigError, DataError, DmpError
from dmp_dl.data.cleaning import DROP_REASONS, CleaningOptions, clean_events, clean_log
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.event_files import EventFileSource
from dmp_dl.data.movielens import MovieLensSource
from dmp_dl.serving.recommender import Recommender

TRIED: Counter = Counter()  # what this module fed to the code, by kind


@pytest.fixture(scope="module", autouse=True)
def report_count(request):
    """Print (and optionally write) how many bad inputs were tried once the module is done."""
    yield
    counts = {"loader_cases": TRIED["loader"], "loader_generated": TRIED["loader_generated"],
              "http_cases": TRIED["http"], "http_generated": TRIED["http_generated"]}
    counts["total"] = sum(counts.values())
    target = os.environ.get("DMP_BAD_INPUTS_REPORT")
    if target:
        Path(target).write_text(json.dumps(counts, indent=1))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nbad inputs tried: {counts['total']} ({json.dumps(counts)})")


# -- the loaders: hand-written corpus -------------------------------------------------------------

H = "user_id,item_id,timestamp\n"
GOOD = "u1,i1,1700000000\n"


@dataclass
class Err:
    """The case must raise ``kind`` with a message matching ``pattern`` that names ``names``
    (``"path"``: the offending file; anything else: that text, e.g. a config key)."""

    kind: type[DmpError]
    pattern: str
    names: str = "path"


@dataclass
class Drops:
    """The case must load, keep ``rows_out`` events and count exactly ``dropped``."""

    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    check: Callable[[pd.DataFrame], None] | None = None


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def _truncated_parquet(tmp: Path) -> Path:
    path = tmp / "e.parquet"
    parquet(path, pa.table({"user_id": ["u"] * 200, "item_id": ["i"] * 200, "timestamp": [1700000000] * 200}))
    return write(path, path.read_bytes()[:-40])


def _ids_equal(column: str, expected: list[str]):
    def check(events: pd.DataFrame) -> None:
        assert sorted(events[column]) == sorted(expected), events[column].tolist()

    return check


# name -> (build(tmp) -> file path or source kwargs, expectation)
LOADER_CASES: dict[str, tuple[Callable[[Path], object], Err | Drops]] = {
    # delimiters
    "space_delimited": (lambda t: write(t / "e.csv", "user_id item_id timestamp\nu1 i1 1700000000\n"),
                        Err(DataError, r"lacks required column 'user_id'.*data\.source\.sep")),
    "semicolon_detected": (lambda t: write(t / "e.csv", "user_id;item_id;timestamp\nu1;i1;1700000000\n"), Drops(1)),
    "tab_detected": (lambda t: write(t / "e.tsv", "user_id\titem_id\ttimestamp\nu1\ti1\t1700000000\n"), Drops(1)),
    "pipe_detected": (lambda t: write(t / "e.csv", "user_id|item_id|timestamp\nu1|i1|1700000000\n"), Drops(1)),
    "explicit_wrong_sep": (lambda t: {"path": write(t / "e.csv", H + GOOD), "sep": ";"},
                           Err(DataError, r"lacks required column 'user_id'.*data\.source\.sep")),
    "multichar_sep": (lambda t: {"path": write(t / "e.csv", H + GOOD), "sep": "::"}, Err(ConfigError, "data.source.sep", "data.source.sep")),
    "empty_sep": (lambda t: {"path": write(t / "e.csv", H + GOOD), "sep": ""}, Err(ConfigError, "data.source.sep", "data.source.sep")),
    "newline_sep": (lambda t: {"path": write(t / "e.csv", H + GOOD), "sep": "\n"}, Err(ConfigError, "data.source.sep", "data.source.sep")),
    # columns
    "missing_timestamp_column": (lambda t: write(t / "e.csv", "user_id,item_id\nu1,i1\n"), Drops(1)),  # a timeless log
    "constant_placeholder_timestamps": (lambda t: write(t / "e.csv", H + "u1,i1,0\nu2,i2,0\n"), Drops(2)),  # no times, not out of range
    "missing_item_column_parquet": (lambda t: parquet(t / "e.parquet", pa.table({"user_id": ["u"], "timestamp": [1]})),
                                    Err(DataError, "lacks required column 'item_id'")),
    "header_in_other_case": (lambda t: write(t / "e.csv", "User_ID,Item_ID,Timestamp\nu1,i1,1700000000\n"),
                             Err(DataError, "lacks required column 'user_id'")),
    "mapping_names_absent_column": (lambda t: {"path": write(t / "e.csv", H + GOOD), "columns": {"user_id": "customer"}},
                                    Err(DataError, r"\['customer'\].*data\.source\.columns")),
    "mapping_creates_duplicate": (lambda t: {"path": write(t / "e.csv", "user_id,cust,item_id,timestamp\nu,v,i,1700000000\n"),
                                             "columns": {"user_id": "cust"}},
                                  Err(DataError, r"duplicated column name\(s\) \['user_id'\]")),
    "extra_columns_ignored": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp,note,,x\nu1,i1,1700000000,a,b,c\n"),
                              Drops(1)),
    "padded_header_names": (lambda t: write(t / "e.csv", " user_id , item_id ,timestamp \nu1,i1,1700000000\n"), Drops(1)),
    # duplicated headers
    "duplicated_header_csv": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp,user_id\nu1,i1,1700000000,u2\n"),
                              Err(DataError, r"duplicated column name\(s\) \['user_id'\]")),
    "duplicated_header_parquet": (
        lambda t: parquet(t / "e.parquet", pa.Table.from_arrays(
            [pa.array(["u"]), pa.array(["i"]), pa.array([1700000000]), pa.array([1700000001])],
            names=["user_id", "item_id", "timestamp", "timestamp"])),
        Err(DataError, r"duplicated column name\(s\) \['timestamp'\]")),
    # empty and near-empty files
    "empty_file": (lambda t: write(t / "e.csv", ""), Err(DataError, "empty")),
    "blank_lines_only": (lambda t: write(t / "e.csv", "\n\n\n"), Err(DataError, "empty")),
    "header_only": (lambda t: write(t / "e.csv", H), Err(DataError, r"no events left.*0 rows in")),
    "parquet_zero_rows": (lambda t: parquet(t / "e.parquet", pa.table({"user_id": pa.array([], pa.string()),
                                                                       "item_id": pa.array([], pa.string()),
                                                                       "timestamp": pa.array([], pa.int64())})),
                          Err(DataError, r"no events left.*0 rows in")),
    "every_row_bad": (lambda t: write(t / "e.csv", H + "u1,i1,garbage\n,i2,1700000000\n"),
                      Err(DataError, r"no events left.*bad_timestamp.*missing_user_id|no events left.*missing_user_id.*bad_timestamp")),
    # NaN / inf / missing tokens
    "nan_inf_tokens": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp,value\n"
                                       "u1,i1,nan,1\nnan,i1,1700000000,1\nu1,NULL,1700000000,1\nu1,i1,inf,1\n"
                                       "u1,i1,-inf,1\nu2,i2,1700000000,NaN\nu3,i3,1700000000,inf\nu4,i4,1700000000,-Infinity\n"
                                       "u5,i5,1700000000,\n"),
                       Drops(1, {"bad_timestamp": 3, "missing_user_id": 1, "missing_item_id": 1, "bad_value": 3})),
    "parquet_nan_inf": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": [np.nan, np.inf, 1e300, 3.0, 4.0], "item_id": [1, 2, 3, 4, 5],
        "timestamp": [1700000000.0, np.nan, np.inf, 1700000000.5, 1700000000.0], "value": [1.0, 2.0, 3.0, np.inf, -0.0]})),
        Drops(1, {"missing_user_id": 2, "bad_timestamp": 1, "bad_value": 1}, _ids_equal("user_id", ["4"]))),
    # mixed types
    "mixed_types_per_column": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp,event_type,value\n"
                                               "1,i1,1700000000,view,1\n1.0,2,1700000001,VIEW,2.5\ntrue,3.5,1700000002,click,abc\n"
                                               "[1],{},x,view,1\nu9,i9,1700000003,,\n"),
                               Drops(3, {"bad_value": 1, "bad_timestamp": 1}, _ids_equal("user_id", ["1", "1.0", "u9"]))),
    "parquet_wrong_types": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": [[1, 2], [3], [4]], "item_id": [{"a": 1}, {"a": 2}, {"a": 3}],
        "timestamp": [b"x", b"\xff", b"1700000000"]})), Err(DataError, r"no events left.*'bad_timestamp': 3")),
    "parquet_bool_timestamps": (lambda t: parquet(t / "e.parquet", pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 3],
                                                                            "timestamp": pa.array([True, False, None])})),
                                Err(DataError, r"no events left.*bad_timestamp")),
    "parquet_string_values_and_types": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": [1, 2, 3], "item_id": [1, 2, 3], "timestamp": [1700000000] * 3, "value": ["x", "3", None],
        "event_type": ["1", None, "view"]})), Drops(2, {"bad_value": 1})),
    "parquet_null_typed_ids": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": pa.array([None, None], pa.null()), "item_id": [1, 2], "timestamp": [1700000000] * 2})),
        Err(DataError, r"no events left.*missing_user_id")),
    "parquet_timezone_and_dates": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": [1, 2], "item_id": [1, 2],
        "timestamp": pa.array([pd.Timestamp("2023-01-01", tz="Europe/Paris"), None], pa.timestamp("ns", tz="Europe/Paris"))})),
        Drops(1, {"bad_timestamp": 1})),
    # huge ids and numbers
    "huge_ids_kept_exactly": (lambda t: write(t / "e.csv", H + "9" * 40 + ",i1,1700000000\nu1," + "1" * 30 + ",1700000000\n"),
                              Drops(2, {}, _ids_equal("user_id", ["9" * 40, "u1"]))),
    "huge_timestamps": (lambda t: write(t / "e.csv", H + "u1,i1,1e400\nu1,i2,99999999999999999999\nu1,i3,1700000000000\n" + GOOD),
                        Drops(1, {"bad_timestamp": 1, "timestamp_out_of_range": 2})),
    "parquet_uint64_and_int64_extremes": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": pa.array([2**64 - 1, 5], pa.uint64()), "item_id": [1, 2],
        "timestamp": pa.array([1700000000, 2**63 - 1], pa.int64())})),
        Drops(1, {"timestamp_out_of_range": 1}, _ids_equal("user_id", [str(2**64 - 1)]))),
    "negative_timestamp": (lambda t: write(t / "e.csv", H + "u1,i1,-5\n" + GOOD), Drops(1, {"timestamp_out_of_range": 1})),
    # encodings
    "non_utf8_in_a_row": (lambda t: write(t / "e.csv", H.encode() + b"Jos\xe9,i1,1700000000\n"),
                          Err(DataError, r"not valid utf-8.*data\.source\.encoding")),
    "non_utf8_in_the_header": (lambda t: write(t / "e.csv", b"us\xffer_id,item_id,timestamp\nu,i,1\n"),
                               Err(DataError, r"header line is not valid utf-8.*data\.source\.encoding")),
    "non_utf8_in_a_malformed_row": (lambda t: write(t / "e.csv", H.encode() + b"u1,i1,1700000000\nu\xff,i2,1,extra\n"),
                                    Err(DataError, r"not valid utf-8.*data\.source\.encoding")),
    "latin1_with_its_encoding": (lambda t: {"path": write(t / "e.csv", (H + "José,i1,1700000000\n").encode("latin-1")),
                                            "encoding": "latin-1"}, Drops(1, {}, _ids_equal("user_id", ["José"]))),
    "utf16_bom_detected": (lambda t: write(t / "e.csv", (H + GOOD).encode("utf-16")), Drops(1, {}, _ids_equal("user_id", ["u1"]))),
    "utf8_read_as_utf16": (lambda t: {"path": write(t / "e.csv", H + GOOD), "encoding": "utf-16"}, Err(DataError, "utf-16")),
    "unknown_encoding": (lambda t: {"path": write(t / "e.csv", H + GOOD), "encoding": "klingon"}, Err(DataError, "klingon")),
    "bom": (lambda t: write(t / "e.csv", b"\xef\xbb\xbf" + (H + GOOD).encode()), Drops(1)),
    "binary_garbage": (lambda t: write(t / "e.csv", bytes(range(256)) * 8), Err(DataError, "")),
    "unicode_ids": (lambda t: write(t / "e.csv", H + "😀,i1,1700000000\nu\u200b,ï,1700000000\n"),
                    Drops(2, {}, _ids_equal("user_id", ["😀", "u\u200b"]))),
    # timestamps in mixed formats
    "mixed_timestamp_formats": (lambda t: write(t / "e.csv", H + "u1,i1,1700000000\nu1,i2,2023-11-14T22:13:20Z\n"
                                                "u1,i3,2023-11-14\nu1,i4,14/11/2023\nu1,i5,Nov 14 2023\n"
                                                "u1,i6,2023-11-14 22:13:20+02:00\nu1,i7,1700000000.5\n"
                                                "u1,i8,2023-02-30T00:00:00\nu1,i9,2023-11-14T22:13:20+25:00\n"),
                                Drops(5, {"bad_timestamp": 4})),
    # line endings, quoting, ragged rows
    "crlf": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp\r\nu1,i1,1700000000\r\nu2,i2,1700000001\r\n"), Drops(2)),
    "quoted_fields_with_separators": (lambda t: write(t / "e.csv", H + '"u,1","i ""x""",1700000000\n'),
                                      Drops(1, {}, _ids_equal("item_id", ['i "x"']))),
    "quoted_header": (lambda t: write(t / "e.csv", '"user_id","item_id","timestamp"\n"u1","i1","1700000000"\n'), Drops(1)),
    "unbalanced_quote": (lambda t: write(t / "e.csv", H + GOOD + '"u2,i2,1700000001\nu3,i3,1700000002\n'),
                         Drops(1, {"malformed_row": 1})),
    "ragged_rows": (lambda t: write(t / "e.csv", H + GOOD + "u2,i2\nu3,i3,1700000002,extra\nu4\n"),
                    Drops(1, {"malformed_row": 3})),
    "nul_bytes": (lambda t: write(t / "e.csv", H + "u\x001,i1,1700000000\n"), Drops(1)),
    # not a readable file
    "directory_instead_of_file": (lambda t: (t / "e.csv").mkdir() or t / "e.csv", Err(DataError, "is a directory")),
    "missing_file": (lambda t: t / "nope.csv", Err(DataError, "not found")),
    "unknown_suffix": (lambda t: write(t / "e.json", "{}"), Err(DataError, "unknown file type")),
    "movielens_file_as_events": (lambda t: write(t / "ratings.dat", "1::1193::5::978300760\n"),
                                 Err(DataError, "a MovieLens file: read its folder with data=movielens data.path=")),
    "corrupt_parquet": (lambda t: write(t / "e.parquet", b"PAR1 not really parquet PAR1"), Err(DataError, "cannot read as Parquet")),
    "truncated_parquet": (_truncated_parquet, Err(DataError, "cannot read as Parquet")),
    "csv_named_parquet": (lambda t: write(t / "e.parquet", H + GOOD), Err(DataError, "cannot read as Parquet")),
    "not_gzip": (lambda t: write(t / "e.csv.gz", "plain text"), Err(DataError, "lacks required column 'user_id'")),
    "truncated_gzip": (lambda t: write(t / "e.csv.gz", gzip.compress((H + GOOD * 3000).encode())[:-100]), Err(DataError, "cannot read")),
    "truncated_bz2": (lambda t: write(t / "e.csv.bz2", bz2.compress((H + GOOD * 3000).encode())[:-100]), Err(DataError, "cannot read")),
    # attribute tables
    "users_table_duplicated_header": (lambda t: {"path": write(t / "e.csv", H + GOOD),
                                                 "users": write(t / "u.csv", "user_id,age,age\n1,2,3\n")},
                                      Err(DataError, r"u\.csv: duplicated column")),
    "users_table_without_id": (lambda t: {"path": write(t / "e.csv", H + GOOD), "users": write(t / "u.csv", "id,age\n1,2\n")},
                               Err(DataError, r"u\.csv: user attributes file lacks required column 'user_id'")),
    "items_table_is_a_directory": (lambda t: {"path": write(t / "e.csv", H + GOOD), "items": (t / "items").mkdir() or t / "items"},
                                   Err(DataError, "is a directory")),
    # compression is recognised by the first bytes, whatever the name says
    "gzip_with_upper_case_suffix": (lambda t: write(t / "E.CSV.GZ", gzip.compress((H + GOOD + "u2,i2,1700000001\n").encode())),
                                    Drops(2, {}, _ids_equal("user_id", ["u1", "u2"]))),
    "gzip_named_csv": (lambda t: write(t / "e.csv", gzip.compress((H + GOOD).encode())), Drops(1, {}, _ids_equal("user_id", ["u1"]))),
    "bz2_named_tsv": (lambda t: write(t / "e.tsv.BZ2", bz2.compress(b"user_id\titem_id\ttimestamp\nu1\ti1\t1700000000\n")),
                      Drops(1, {}, _ids_equal("user_id", ["u1"]))),
    # UTF-16 and UTF-32: by byte-order mark, or data.source.encoding
    "utf16_with_its_encoding": (lambda t: {"path": write(t / "e.csv", (H + "Jos\u00e9,i1,1700000000\n").encode("utf-16")),
                                           "encoding": "utf-16"}, Drops(1, {}, _ids_equal("user_id", ["Jos\u00e9"]))),
    "utf16_le_without_bom": (lambda t: {"path": write(t / "e.csv", (H + GOOD).encode("utf-16-le")), "encoding": "utf-16-le"},
                             Drops(1, {}, _ids_equal("user_id", ["u1"]))),
    "utf32_bom_detected": (lambda t: write(t / "e.csv", (H + "\U0001f600,i1,1700000000\n").encode("utf-32")),
                           Drops(1, {}, _ids_equal("user_id", ["\U0001f600"]))),
    "utf16_gzipped": (lambda t: write(t / "e.csv.gz", gzip.compress((H + GOOD).encode("utf-16"))), Drops(1)),
    # Parquet ids stored as binary, dates past pandas' nanosecond range
    "parquet_binary_ids_decoded": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": pa.array([b"u0", b"u1"], pa.binary()), "item_id": pa.array([b"i0", b"i\xc3\xa9"], pa.large_binary()),
        "timestamp": [1700000000] * 2})), Drops(2, {}, _ids_equal("user_id", ["u0", "u1"]))),
    "parquet_binary_ids_not_utf8": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": pa.array([b"u0", b"\xff\xfe"], pa.binary()), "item_id": ["i0", "i1"], "timestamp": [1700000000] * 2})),
        Err(DataError, r"column 'user_id' is binary and row 2 is not UTF-8 text")),
    "parquet_year_9999": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"],
        "timestamp": pa.array([pd.Timestamp("2023-11-14").to_pydatetime(), pd.Timestamp("9999-12-31").to_pydatetime(), None],
                              pa.timestamp("us"))})), Drops(1, {"timestamp_out_of_range": 1, "bad_timestamp": 1})),
    "parquet_year_9999_in_ms_with_timezone": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
        "timestamp": pa.array([1_700_000_000_000, 253_402_214_400_000], pa.timestamp("ms", tz="UTC"))})),
        Drops(1, {"timestamp_out_of_range": 1})),
    "parquet_date32_year_9999": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
        "timestamp": pa.array([pd.Timestamp("2023-11-14").date(), pd.Timestamp("9999-01-01").date()], pa.date32())})),
        Drops(1, {"timestamp_out_of_range": 1})),
    "iso_text_year_9999": (lambda t: write(t / "e.csv", H + GOOD + "u2,i2,9999-12-31T00:00:00Z\n"),
                           Drops(1, {"timestamp_out_of_range": 1})),
    # archives that are not read, and UTF-16 without a byte-order mark read as UTF-8
    "xz_named_csv": (lambda t: write(t / "e.csv", lzma.compress((H + GOOD).encode())), Err(DataError, "is an xz archive")),
    "zip_named_csv": (lambda t: write(t / "e.csv", b"PK\x03\x04" + bytes(60)), Err(DataError, "is a zip archive")),
    "utf16_le_without_bom_read_as_utf8": (lambda t: write(t / "e.csv", (H + GOOD).encode("utf-16-le")),
                                          Err(DataError, r"NUL bytes.*data\.source\.encoding=utf-16-le")),
    # absurd magnitudes are bad values, not numbers that overflow later
    "absurd_values": (lambda t: write(t / "e.csv", "user_id,item_id,timestamp,value\n" + "u1,i1,1700000000,1e308\n"
                                      "u2,i2,1700000000,-2e12\nu3,i3,1700000000,1e12\nu4,i4,1700000000,999999\n"
                                      "u5,i5,1700000000," + "9" * 400 + "\n"),
                      Drops(2, {"bad_value": 3}, _ids_equal("user_id", ["u3", "u4"]))),
    "parquet_absurd_values": (lambda t: parquet(t / "e.parquet", pa.table({
        "user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"], "timestamp": [1700000000] * 3,
        "value": [1e300, -1e13, 4.5]})), Drops(1, {"bad_value": 2}, _ids_equal("user_id", ["u3"]))),
}


def load_clean(spec: object, **cleaning) -> tuple:
    kwargs = dict(spec) if isinstance(spec, dict) else {"path": spec}
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    raw = EventFileSource(**kwargs).load()
    return clean_log(raw, CleaningOptions(**cleaning))


def check_error(exc: DmpError, expected: Err, spec: object) -> None:
    message = str(exc)
    assert isinstance(exc, expected.kind), f"{type(exc).__name__}: {message}"
    assert re.search(expected.pattern, message, re.I | re.S), message
    if expected.names == "path":
        files = [v for v in (spec.values() if isinstance(spec, dict) else [spec]) if isinstance(v, Path)]
        assert any(str(f) in message for f in files), f"the message does not name the file: {message}"
    else:
        assert expected.names in message, message
    assert "\n" not in message.strip() or "Traceback" not in message


def check_accounting(report) -> None:
    ev = report.events
    assert ev.rows_in - ev.rows_out == sum(ev.dropped.values())
    assert set(ev.dropped) <= set(DROP_REASONS)


@pytest.mark.parametrize("name", list(LOADER_CASES))
def test_loader_corpus(tmp_path, name):
    TRIED["loader"] += 1
    build, expected = LOADER_CASES[name]
    spec = build(tmp_path)
    if isinstance(expected, Err):
        with pytest.raises(DmpError) as info:
            load_clean(spec)
        check_error(info.value, expected, spec)
        return
    clean, report = load_clean(spec)
    check_accounting(report)
    assert report.events.rows_out == expected.rows_out == len(clean.events), report.events
    assert report.events.dropped == expected.dropped
    if expected.check:
        expected.check(clean.events)


@pytest.mark.parametrize("options, key", [
    ({"event_weights": {"view": "heavy"}}, "data.cleaning.event_weights.view"),
    ({"event_weights": ["view"]}, "data.cleaning.event_weights"),
    ({"event_weights": {"view": -1}}, "data.cleaning.event_weights"),
    ({"event_weights": {"view": float("inf")}}, "data.cleaning.event_weights.view"),
    ({"min_value": "four"}, "data.cleaning.min_value"),
    ({"min_value": float("nan")}, "data.cleaning.min_value"),
    ({"value_fill": float("nan")}, "data.cleaning.value_fill"),
    ({"kcore_users": -3}, "data.cleaning.kcore_users"),
    ({"kcore_items": "x"}, "data.cleaning.kcore_items"),
    ({"timestamp_unit": "h"}, "data.cleaning.timestamp_unit"),
    ({"min_timestamp": "yesterday-ish"}, "data.cleaning.min/max_timestamp"),
])
def test_bad_cleaning_options_name_the_key(tmp_path, options, key):
    TRIED["loader"] += 1
    with pytest.raises(ConfigError) as info:
        load_clean(write(tmp_path / "e.csv", H + GOOD), **options)
    assert key in str(info.value)


def test_a_single_positive_type_given_as_a_string(tmp_path):
    TRIED["loader"] += 1
    spec = write(tmp_path / "e.csv", "user_id,item_id,timestamp,event_type\nu,i,1700000000,purchase\nu,j,1700000000,view\n")
    clean, report = load_clean(spec, positive_event_types="purchase")
    assert report.events.dropped == {"not_positive_event": 1} and clean.events["item_id"].tolist() == ["i"]


@pytest.mark.parametrize("case", ["erasure_dir", "erasure_not_utf8", "erasure_missing", "negative_history_len"])
def test_datamodule_inputs(tmp_path, case):
    TRIED["loader"] += 1
    events = write(tmp_path / "e.csv", H + GOOD)
    kwargs: dict = {}
    if case == "erasure_dir":
        kwargs["erasure_list"] = str(tmp_path)
    elif case == "erasure_not_utf8":
        kwargs["erasure_list"] = str(write(tmp_path / "erased.txt", b"\xff\xfe\x00"))
    elif case == "erasure_missing":
        kwargs["erasure_list"] = str(tmp_path / "none.txt")
    else:
        kwargs["history_len"] = -1
    with pytest.raises(DmpError) as info:
        InteractionDataModule(EventFileSource, path=str(events), **kwargs).prepare()
    assert ("data.history_len" if case == "negative_history_len" else "erasure list") in str(info.value)


def test_huge_numeric_attribute_values_are_emptied_and_counted(tmp_path):
    """Numeric attribute values beyond data.cleaning.max_abs_value (1e308 would make the mean, the
    variance and every standardised feature overflow) are emptied and counted; the column stays."""
    TRIED["loader"] += 1
    events = write(tmp_path / "e.csv", H + "".join(f"u{i},i{i % 3},{1700000000 + i}\n" for i in range(30)))
    users = write(tmp_path / "u.csv", "user_id,age,region\n" + "".join(f"u{i},{1e308 if i % 2 else 3 + i},r{i % 2}\n" for i in range(30)))
    dm = InteractionDataModule(EventFileSource, path=str(events), users=str(users)).prepare()
    assert "age" in dm.user_features.numeric_columns and np.isfinite(dm.user_features.numeric).all()
    assert dm.report.users_table.bad_values == {"age": 15}
    assert np.isfinite(dm.user_features.numeric_mean).all()


def test_attribute_tables_that_match_no_event_are_warned_and_counted(tmp_path, caplog):
    """A user table whose ids are written differently from the events' (here ``b'u0'`` against
    ``u0``, as a Parquet binary column used to become) matches nobody: one warning, and a count."""
    TRIED["loader"] += 1
    events = write(tmp_path / "e.csv", H + "".join(f"u{i},i{i % 3},{1700000000 + i}\n" for i in range(10)))
    users = write(tmp_path / "u.csv", "user_id,age\n" + "".join(f"b'u{i}',{20 + i}\n" for i in range(10)))
    items = write(tmp_path / "i.csv", "item_id,genre\ni0,a\ni1,b\ni9,c\n")
    with caplog.at_level("INFO", logger="dmp_dl.data.datamodule"):
        dm = InteractionDataModule(EventFileSource, path=str(events), users=str(users), items=str(items)).prepare()
    assert dm.report.users_table.unmatched_ids == 10 and dm.report.items_table.unmatched_ids == 1
    assert dm.report.to_dict()["users_table"]["unmatched_ids"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "data.users: none of its 10 user_id values matches an id of the events" in warnings[0]
    assert "\"b'u0'\" in the table, 'u0' in the events" in warnings[0]


def _movielens(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "ml"
    root.mkdir()
    for name, content in files.items():
        if content is None:
            (root / name).mkdir()
        else:
            (root / name).write_bytes(content)
    return root


U_DATA = b"1\t10\t5\t881250949\n2\t20\t3\t881250950\n"


@pytest.mark.parametrize("files, expected", [
    ({}, Err(DataError, "no MovieLens ratings file")),
    ({"u.data": None}, Err(DataError, r"u\.data: cannot read MovieLens file")),
    ({"u.data": b"1\t10\tfive\tnope\n" + U_DATA}, Drops(2, {"bad_timestamp": 1})),
    ({"u.data": b"1\t10\n" + U_DATA}, Drops(2, {"bad_timestamp": 1})),
    ({"u.data": b"\xff\t1\t2\t3\n"}, Err(DataError, r"u\.data: cannot read")),
    ({"u.data": U_DATA, "u.item": b"10|Toy (1995)|01-Jan-1995\n20|\n"}, Drops(2)),
    ({"u.data": U_DATA, "u.user": b"1|24\n2\n"}, Drops(2)),
    ({"ratings.csv": b"user,movie\n1,2\n"}, Err(DataError, r"ratings\.csv: lacks column 'userId'")),
    ({"ratings.csv": b"userId,movieId,rating,timestamp\n1,2,x,3\n"}, Err(DataError, r"ratings\.csv: cannot read.*'x'")),
    ({"ratings.csv": b"userId,movieId,rating,timestamp\n1,2,3,881250949\n", "movies.csv": b"movieId,name\n2,x\n"},
     Err(DataError, r"movies\.csv: lacks column 'title'")),
    ({"ratings.dat": b"1::2::3::881250949\n1::2::3::4::5\n"}, Err(DataError, r"ratings\.dat: cannot read.*line 2")),
], ids=["no_ratings", "u_data_is_dir", "ml100k_bad_values", "ml100k_short_row", "ml100k_not_utf8",
        "ml100k_short_item_rows", "ml100k_short_user_rows", "ml20_wrong_columns", "ml20_bad_rating",
        "ml20_movies_wrong_columns", "ml1m_ragged"])
def test_movielens_corpus(tmp_path, files, expected):
    TRIED["loader"] += 1
    root = _movielens(tmp_path, files)
    if isinstance(expected, Err):
        with pytest.raises(DmpError) as info:
            clean_log(MovieLensSource(str(root)).load(), CleaningOptions())
        assert re.search(expected.pattern, str(info.value)), str(info.value)
        assert str(root) in str(info.value)
        return
    clean, report = clean_log(MovieLensSource(str(root)).load(), CleaningOptions())
    check_accounting(report)
    assert report.events.rows_out == expected.rows_out and report.events.dropped == expected.dropped


# -- the loaders: generated inputs ----------------------------------------------------------------

TOKENS = ["", " ", "u1", "i1", "1", "1.0", "-1", "0", "1700000000", "1700000000000", "1e400", "-inf", "inf", "nan",
          "NaN", "null", "None", "N/A", "2023-11-14", "2023-11-14T22:13:20Z", "2023-02-30", "14/11/2023", "true",
          "9" * 30, "😀", "é", "\u200b", "a,b", "\"", "\"q\"", "x\ty", ";", "|", "view", "purchase", "PURCHASE"]
COLUMNS = ["user_id", "item_id", "timestamp", "event_type", "value", "extra", ""]
GENERATED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])


def _expect_clean_or_dmp_error(path: Path, **source) -> None:
    try:
        clean, report = load_clean({"path": path, **source})
    except DmpError as exc:
        assert str(path) in str(exc) or "data." in str(exc), str(exc)
        return
    check_accounting(report)
    assert len(clean.events) == report.events.rows_out > 0
    assert clean.events["timestamp"].dtype == np.int64 and np.isfinite(clean.events["value"]).all()


@GENERATED
@given(header=st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=7),
       rows=st.lists(st.lists(st.sampled_from(TOKENS), max_size=8), max_size=25),
       sep=st.sampled_from([",", ";", "\t", "|"]), crlf=st.booleans())
def test_generated_csv_files(tmp_path, header, rows, sep, crlf):
    TRIED["loader_generated"] += 1
    newline = "\r\n" if crlf else "\n"
    text = newline.join([sep.join(header), *(sep.join(r) for r in rows)]) + newline
    path = write(tmp_path / "gen.csv", text)
    _expect_clean_or_dmp_error(path)


@GENERATED
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".csv", ".parquet", ".csv.gz", ".tsv"]))
def test_generated_bytes(tmp_path, data, suffix):
    TRIED["loader_generated"] += 1
    path = write(tmp_path / f"gen{suffix}", H.encode() + data if suffix in (".csv", ".tsv") else data)
    _expect_clean_or_dmp_error(path)


CELLS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.binary(max_size=6), st.sampled_from(TOKENS))


@GENERATED
@given(frame=st.integers(0, 20).flatmap(lambda n: st.fixed_dictionaries(
    {c: st.lists(CELLS, min_size=n, max_size=n) for c in ("user_id", "item_id", "timestamp", "event_type", "value")})))
def test_generated_frames_through_cleaning(frame):
    """Object columns with any mix of Python values (what a Parquet or pandas source may give)."""
    TRIED["loader_generated"] += 1
    raw = pd.DataFrame(frame)
    events, report = clean_events(raw, CleaningOptions())
    assert report.rows_in == len(raw) and report.rows_in - report.rows_out == sum(report.dropped.values())
    assert len(events) == report.rows_out
    assert np.isfinite(events["value"]).all() if len(events) else True


# -- the HTTP API ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rec(trained) -> Recommender:
    return Recommender.load(trained["bundle_dir"])


@pytest.fixture(scope="module")
def client(rec):
    # raise_server_exceptions=False: an unhandled exception shows up as the 500 a client would get
    return TestClient(create_app(rec, max_ids=50, max_body_bytes=4096), raise_server_exceptions=False)


def json_body(raw: bytes) -> dict:
    return {"content": raw, "headers": {"content-type": "application/json"}}


U, I = "<user>", "<item>"
HTTP_CASES = [
    # unknown ids
    ("get", "/recommend", {"params": {"user_id": "ghost"}}, 404, "unknown user id"),
    ("get", "/recommend", {"params": {"user_id": ""}}, 404, "unknown user id"),
    ("get", "/similar-items", {"params": {"item_id": "ghost"}}, 404, "unknown item id"),
    ("post", "/recommend", {"json": {"history": [I, "ghost"]}}, 404, "unknown item id: 'ghost'"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U, "ghost"]}}, 404, "ghost"),
    ("post", "/propensity", {"json": {"user_ids": ["ghost"]}}, 409, "no propensity model"),  # the test bundle has none
    # unicode and odd ids
    ("get", "/recommend", {"params": {"user_id": "ü\u200b😀"}}, 404, "unknown user id"),
    ("get", "/recommend", {"params": {"user_id": "\x00"}}, 404, "unknown user id"),
    ("get", "/recommend?user_id=%ff%fe", {}, 404, "unknown user id"),
    ("get", "/recommend", {"params": {"user_id": "x" * 60_000}}, 404, "unknown user id"),
    ("post", "/recommend", json_body(b'{"history": ["\\ud800"]}'), 404, "unknown item id"),
    ("post", "/recommend", {"json": {"history": ["日本語", "ελληνικά"]}}, 404, "unknown item id"),
    ("post", "/recommend", json_body(b'{"history": ["\xff"]}'), 400, "error parsing the body"),
    # empty and huge lists
    ("post", "/recommend", {"json": {"history": []}}, 422, "history is empty"),
    ("post", "/recommend", {"json": {"history": [], "attributes": {}}}, 422, "history is empty"),
    ("post", "/lookalike", {"json": {"seed_user_ids": []}}, 422, "seed_user_ids is empty"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U] * 51}}, 422, "at most 50 per request"),
    ("post", "/recommend", {"json": {"history": [I] * 51}}, 422, "at most 50 per request"),
    ("post", "/propensity", {"json": {"user_ids": [U] * 51}}, 422, "at most 50 per request"),
    ("post", "/recommend", {"json": {"history": [I] * 2000}}, 413, "over 4096 bytes"),
    # k
    ("get", "/recommend", {"params": {"user_id": U, "k": 0}}, 422, "k must be an integer in 1..1000"),
    ("get", "/recommend", {"params": {"user_id": U, "k": -1}}, 422, "k must be an integer in 1..1000"),
    ("get", "/recommend", {"params": {"user_id": U, "k": 10**9}}, 422, "k must be an integer in 1..1000"),
    ("get", "/recommend", {"params": {"user_id": U, "k": 10**30}}, 422, "1..1000"),
    ("get", "/recommend", {"params": {"user_id": U, "k": "ten"}}, 422, "valid integer"),
    ("get", "/recommend", {"params": {"user_id": U, "k": "1e3"}}, 422, "valid integer"),
    ("get", "/recommend", {"params": {"user_id": U, "k": "nan"}}, 422, "valid integer"),
    ("get", "/similar-items", {"params": {"item_id": I, "k": 0}}, 422, "1..1000"),
    ("get", "/similar-items", {"params": {"item_id": I, "k": 10**9}}, 422, "1..1000"),
    ("post", "/recommend", {"json": {"history": [I], "k": 0}}, 422, "1..1000"),
    ("post", "/recommend", {"json": {"history": [I], "k": 10**9}}, 422, "1..1000"),
    ("post", "/recommend", {"json": {"history": [I], "k": -5}}, 422, "1..1000"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U], "k": 10**9}}, 422, "1..1000"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U], "k": 0, "method": "neighbours"}}, 422, "1..1000"),
    ("post", "/recommend", json_body(b'{"history": ["<item>"], "k": 1e999}'), 422, "valid integer"),
    ("post", "/recommend", json_body(b'{"history": ["<item>"], "k": NaN}'), 422, "valid integer"),
    # wrong JSON types
    ("post", "/recommend", {"json": {"history": [I], "k": "5"}}, 422, "valid integer"),
    ("post", "/recommend", {"json": {"history": [I], "k": True}}, 422, "valid integer"),
    ("post", "/recommend", {"json": {"history": [I], "k": 1.5}}, 422, "valid integer"),
    ("post", "/recommend", {"json": {"history": [I], "k": None}}, 422, "valid integer"),
    ("post", "/recommend", {"json": {"history": I}}, 422, "valid list"),
    ("post", "/recommend", {"json": {"history": [[I]]}}, 422, "history"),
    ("post", "/recommend", {"json": {"history": [None]}}, 422, "history"),
    ("post", "/recommend", {"json": {"history": [True]}}, 422, "history"),
    ("post", "/recommend", {"json": {"history": [{"id": I}]}}, 422, "history"),
    ("post", "/recommend", {"json": {"history": [I], "exclude_seen": "yes"}}, 422, "valid boolean"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": []}}, 422, "valid dictionary"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"age": [1]}}}, 422, "attributes"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"shoe": "x"}}}, 422, "unknown attribute"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"age": 1e308}}}, 422, "outside ±1e+12"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"age": 1e30}}}, 422, "outside ±1e+12"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"age": -(10**13)}}}, 422, "outside ±1e+12"),
    ("post", "/recommend", json_body(b'{"history": ["<item>"], "attributes": {"age": 1' + b"0" * 400 + b'}}'), 422, "outside"),
    ("post", "/recommend", {"json": {"history": [I], "attributes": {"age": "34"}}}, 422, "valid number"),
    ("post", "/recommend", {"json": {"history": [I], "exclude_seens": False}}, 422, "extra inputs"),
    ("post", "/recommend", {"json": {"k": 3}}, 422, "history"),
    ("post", "/recommend", {"json": [1, 2]}, 422, "valid dictionary"),
    ("post", "/recommend", {"json": "history"}, 422, "valid dictionary"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U], "method": "magic"}}, 422, "centroid"),
    ("post", "/lookalike", {"json": {"seed_user_ids": [U], "exclude_seeds": "perhaps"}}, 422, "valid boolean"),
    ("post", "/lookalike", {"json": {"seed_user_ids": U}}, 422, "valid list"),
    ("post", "/propensity", {"json": {"user_ids": U}}, 422, "valid list"),
    ("post", "/propensity", {"json": {"user_ids": [None]}}, 422, "user_ids"),
    ("get", "/recommend", {"params": {"user_id": U, "exclude_seen": "maybe"}}, 422, "valid boolean"),
    ("get", "/recommend", {"params": {"k": 3}}, 422, "user_id"),
    # not JSON, or not a JSON object
    ("post", "/recommend", json_body(b"{not json"), 422, "json"),
    ("post", "/recommend", json_body(b""), 422, "field required"),
    ("post", "/recommend", json_body(b"\xff\xfe{"), 400, "error parsing the body"),
    ("post", "/recommend", {"content": b"history=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 422, "body"),
    ("post", "/recommend", {"content": b'{"history": ["a"]}', "headers": {"content-type": "text/plain"}}, 422, "body"),
    ("post", "/recommend", json_body(b"[" * 3000 + b"]" * 3000), 413, "over 4096 bytes"),
    ("post", "/lookalike", json_body(b"[" * 1000 + b"]" * 1000), 400, "error parsing the body"),
    # oversized bodies
    ("post", "/lookalike", json_body(b'{"seed_user_ids": ["' + b"x" * 5000 + b'"]}'), 413, "over 4096 bytes"),
    ("post", "/propensity", {"content": b"x" * 100_000, "headers": {"content-type": "application/json"}}, 413, "over 4096"),
    # methods and paths
    ("put", "/recommend", {}, 405, "method not allowed"),
    ("delete", "/lookalike", {}, 405, "method not allowed"),
    ("get", "/no-such-endpoint", {}, 404, "not found"),
]


def _fill(x, known: dict):
    if isinstance(x, dict):
        return {k: _fill(v, known) for k, v in x.items()}
    if isinstance(x, list):
        return [_fill(v, known) for v in x]
    if isinstance(x, bytes):
        for key, value in known.items():
            x = x.replace(key.encode(), value.encode())
        return x
    return known.get(x, x) if isinstance(x, str) else x


def assert_json_4xx(r, status: int | None = None) -> None:
    """A 4xx whose body is the declared error schema: a one-line ``detail`` and an ``error`` code."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = ErrorBody.model_validate(r.json())
    assert body.error and body.error == body.error.lower() and " " not in body.error, body
    assert body.detail and "\n" not in body.detail, body


@pytest.mark.parametrize("method, url, kwargs, status, needle", HTTP_CASES,
                         ids=[f"{m}-{u.split('?')[0]}-{i}" for i, (m, u, *_) in enumerate(HTTP_CASES)])
def test_http_corpus(client, rec, method, url, kwargs, status, needle):
    TRIED["http"] += 1
    known = {U: str(rec.user_vocab.ids[1]), I: str(rec.item_vocab.ids[1])}
    r = getattr(client, method)(url, **_fill(kwargs, known))
    assert_json_4xx(r, status)
    assert needle.lower() in r.text.lower(), r.text[:300]


def test_attributes_alone_describe_a_new_user(client, rec):
    """An empty history with attributes is a cold start from attributes (the schema allows it)."""
    TRIED["http"] += 1
    r = client.post("/recommend", json={"history": [], "attributes": {"age": 30}, "k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text[:300]


def test_a_numeric_token_guards_the_api(rec):
    """``serve.py token=12345``: Hydra hands over an int; it is the token's digits, not a 500."""
    client = TestClient(create_app(rec, token=12345), raise_server_exceptions=False)
    TRIED["http"] += 3
    assert client.get("/health").status_code == 200
    assert_json_4xx(client.get("/recommend", params={"user_id": rec.user_vocab.ids[0]}), 401)
    ok = client.get("/recommend", params={"user_id": rec.user_vocab.ids[0]}, headers={"Authorization": "Bearer 12345"})
    assert ok.status_code == 200, ok.text[:300]


def test_streamed_oversized_body(client):
    TRIED["http"] += 1
    chunks = iter([b'{"history": [', b'"x", ' * 2000, b'"x"]}'])  # chunked: no Content-Length to refuse early
    assert_json_4xx(client.post("/recommend", content=chunks, headers={"content-type": "application/json"}), 413)


def test_token_is_required_everywhere_but_health(rec):
    """With a token, every route the app has (including ones added later, and the docs) answers
    401 without it; /health answers without it."""
    app = create_app(rec, token="s3cret")
    client = TestClient(app, raise_server_exceptions=False)
    paths = {(m, r.path) for r in app.routes for m in getattr(r, "methods", None) or ["GET"]}
    assert ("GET", "/recommend") in paths and ("GET", "/openapi.json") in paths
    for method, path in sorted(paths):
        if path == "/health":
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer "}):
            TRIED["http"] += 1
            r = client.request(method, path.replace("{", "").replace("}", ""), headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            if method != "HEAD":  # a HEAD answer has no body
                assert r.json()["detail"] == "missing or invalid bearer token"
    TRIED["http"] += 2
    assert client.get("/health").status_code == 200
    assert client.get("/no-such-path").status_code == 401  # unknown paths do not reveal what exists
    ok = client.get("/recommend", params={"user_id": rec.user_vocab.ids[0]}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


HTTP_GENERATED = settings(max_examples=80, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["<user>", "<item>"]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
BODY_KEYS = ["history", "k", "exclude_seen", "attributes", "seed_user_ids", "exclude_seeds", "method", "user_ids"]


@HTTP_GENERATED
@given(url=st.sampled_from(["/recommend", "/lookalike", "/propensity"]),
       body=st.dictionaries(st.sampled_from(BODY_KEYS) | st.text(max_size=5), JSON_VALUES, max_size=5))
def test_generated_json_bodies(client, rec, url, body):
    TRIED["http_generated"] += 1
    known = {U: str(rec.user_vocab.ids[1]), I: str(rec.item_vocab.ids[1])}
    r = client.post(url, json=_fill(body, known))
    assert r.status_code < 500, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code >= 400:
        assert_json_4xx(r)


@HTTP_GENERATED
@given(url=st.sampled_from(["/recommend", "/similar-items"]),
       params=st.dictionaries(st.sampled_from(["user_id", "item_id", "k", "exclude_seen"]) | st.text(max_size=4),
                              st.text(string.printable + "é😀\x00", max_size=12) | st.integers(-10**12, 10**12), max_size=4))
def test_generated_query_strings(client, url, params):
    TRIED["http_generated"] += 1
    r = client.get(url, params=params)
    assert r.status_code < 500, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code >= 400:
        assert_json_4xx(r)
