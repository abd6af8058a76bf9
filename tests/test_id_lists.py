"""Lists of user ids from files (seeds=, users=, forget's user_ids=) and from the command line
(seed_ids=[...]): one reader, whatever editor wrote the file."""

from __future__ import annotations

import codecs
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.data.id_lists import ids_from_config, read_id_file
from dmp_dl.data.schema import normalize_ids

IDS = ["u000001", "u000002", "u000003"]


@pytest.mark.parametrize("name, data", [
    ("bom_crlf.txt", codecs.BOM_UTF8 + b"u000001\r\nu000002\r\n\r\nu000003\r\n"),
    ("bom_only.txt", codecs.BOM_UTF8 + b"u000001\nu000002\nu000003"),
    ("comments.txt", b"# exported from the CRM\n\n  u000001  \n\t\nu000002\n# u000999\nu000003\n\n"),
    ("utf16.txt", "u000001\r\nu000002\r\nu000003\r\n".encode("utf-16")),  # with its byte-order mark
    ("old_mac.txt", b"u000001\ru000002\ru000003\r"),
    ("bom_crlf.csv", codecs.BOM_UTF8 + b"user_id,note\r\nu000001,a\r\nu000002,b\r\n\r\nu000003,c\r\n"),
    ("semicolons.csv", codecs.BOM_UTF8 + b"note;user_id\r\nx;u000001\r\ny;u000002\r\nz;u000003\r\n"),
    ("tabs.tsv", b"user_id\tscore\nu000001\t1\nu000002\t2\nu000003\t3\n"),
])
def test_every_id_is_read_whatever_the_editor_wrote(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert read_id_file(path, "users") == IDS


def test_a_table_column_is_found_despite_a_byte_order_mark_before_the_header(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"user_id,segment\r\nu000001,3\r\n")
    # without the mark removed the header would be '\ufeffuser_id' and the column not found
    assert read_id_file(path, "seeds", "user_id", "seed_column") == ["u000001"]


def test_ids_follow_the_training_data_spelling(tmp_path):
    floats = tmp_path / "numeric.parquet"
    pq.write_table(pa.table({"user_id": pa.array([7777.0, 12.0, 3.5])}), floats)  # a numeric column read as float
    expected = normalize_ids(pd.Series([7777.0, 12.0, 3.5])).tolist()
    assert read_id_file(floats, "users") == expected == ["7777", "12", "3.5"]
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"user_id": pa.array([b"u000001", b"u000002"], type=pa.binary())}), binary)
    assert read_id_file(binary, "users") == ["u000001", "u000002"]  # text, not "b'u000001'"
    given = [" u000001 ", 7777, "u000002"]
    assert ids_from_config(given, "seed_ids") == normalize_ids(pd.Series(given, dtype=object)).tolist()
    assert ids_from_config(OmegaConf.create({"s": [" u1", 42]}).s, "seed_ids") == ["u1", "42"]
    assert ids_from_config("u000001", "seed_ids") == ["u000001"]


def test_a_text_file_read_without_tables_keeps_its_first_line(tmp_path):
    path = tmp_path / "to_forget.csv"  # no header: every line is a user to forget
    path.write_bytes(codecs.BOM_UTF8 + b"u000001\r\nu000002\r\n")
    assert read_id_file(path, "user_ids", tables=False) == ["u000001", "u000002"]


def test_a_one_column_table_named_otherwise_warns_that_its_first_line_is_a_header(tmp_path, caplog):
    path = tmp_path / "seeds.csv"
    path.write_text("u000001\nu000002\n")
    with caplog.at_level(logging.WARNING, logger="dmp_dl.data.id_lists"):
        assert read_id_file(path, "seeds") == ["u000002"]
    assert "'u000001', is read as the ids" in caplog.text and "add a header line 'user_id'" in caplog.text


@pytest.mark.parametrize("name, data, message", [
    ("empty.txt", b"", r"users: .*empty.txt holds no user ids"),
    ("comments.txt", codecs.BOM_UTF8 + b"# nobody yet\r\n\r\n", r"users: .*comments.txt holds no user ids"),
    ("header_only.csv", b"user_id\n", r"users: .*header_only.csv holds no user ids"),
    ("latin1.txt", b"u000001\nm\xfcller\n", r"users: .*latin1.txt, line 2 is not utf-8 text; save the file as UTF-8"),
    ("gap.csv", b"user_id,note\nu000001,a\n,b\n", r"gap.csv: row 3 has an empty 'user_id'"),
    ("wide.csv", b"customer,note\n1,a\n", r"wide.csv: no 'user_id' column \(found \['customer', 'note'\]\).*user_column=NAME"),
])
def test_a_bad_file_is_one_message_naming_it(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        read_id_file(path, "users", column_key="user_column")
    assert "\n" not in str(info.value)


def test_a_missing_path_or_a_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"seeds: .*missing.txt not found"):
        read_id_file(tmp_path / "missing.txt", "seeds")
    with pytest.raises(DataError, match=r"seeds: .* is a directory"):
        read_id_file(tmp_path, "seeds")


@pytest.mark.parametrize("value, message", [
    ([], r"seed_ids is empty; give at least one user id, e.g. seed_ids=\[u000042,u000101\]"),
    (["u1", None], r"seed_ids\[1\] must be a user id, got None"),
    ([True], r"seed_ids\[0\] must be a user id, got True"),
    (["u1", ["u2"]], r"seed_ids\[1\] must be a user id"),
    (["u1", "  "], r"seed_ids\[1\] is blank"),
])
def test_a_bad_command_line_list_is_one_message_naming_the_element(value, message):
    with pytest.raises(ConfigError, match=message):
        ids_from_config(OmegaConf.create({"ids": value}).ids, "seed_ids")
