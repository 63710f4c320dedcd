"""Reading conversation files: input checks, line numbering, invalid UTF-8, the progress bar's count."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_focusft.data.errors import DataError
from megatron_focusft.data.reading import RawRecord, check_inputs, count_records, iter_records, parse_record

REC = json.dumps({"messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "ok"}]})


def records_or_errors(paths):
    out = []
    for rec in iter_records(paths):
        try:
            out.append((rec.location, parse_record(rec)))
        except DataError as e:
            out.append((rec.location, e))
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_line_is_a_located_skippable_error(tmp_path, gz):
    data = (REC + "\n\n" + REC[:20] + "\xff" + "\n").encode() + b'{"bad": "\xff\xfe"}\n' + (REC + "\n").encode()
    path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = records_or_errors([str(path)])
    assert count_records([str(path)]) == len(got) == 4  # the progress bar's total = records read
    assert [loc for loc, _ in got] == [f"{path.name}:{i}" for i in (1, 3, 4, 5)]
    assert got[0][1]["messages"][0]["content"] == "héllo" and got[3][1] == got[0][1]
    assert isinstance(got[1][1], DataError) and got[1][1].reason == "malformed_json"  # valid UTF-8 (U+00FF)
    err = got[2][1]
    assert isinstance(err, DataError) and err.reason == "bad_encoding"
    assert str(err).startswith(f"{path.name}:4: invalid UTF-8 (byte 0xff at column 10")


def test_byte_order_mark_and_crlf_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (REC + "\r\n" + REC + "\r\n").encode())
    got = records_or_errors([str(path)])
    assert [loc for loc, _ in got] == ["bom.jsonl:1", "bom.jsonl:2"] and all(isinstance(r, dict) for _, r in got)


def test_text_records_still_parse():
    assert parse_record(RawRecord("x:1", REC))["messages"][1]["content"] == "ok"


def test_truncated_gzip_is_a_file_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(((REC + "\n") * 200).encode())[:-30])
    check_inputs([str(path)])  # the header is fine; the damage shows only when read through
    with pytest.raises(DataError, match="cut.jsonl.gz") as e:
        count_records([str(path)])
    assert e.value.reason == "bad_file"
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read past line") as e:
        list(iter_records([str(path)]))
    assert e.value.reason == "bad_file"


RECORDS = [
    {"messages": [{"role": "user", "content": f"q{i} " * (i + 1)}, {"role": "assistant", "content": "a"}]}
    for i in range(7)
]


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_is_read_element_by_element(tmp_path, monkeypatch, indent):
    import megatron_focusft.data.reading as reading

    monkeypatch.setattr(reading, "_JSON_CHUNK", 5)  # every element is cut by the read window at least once
    path = tmp_path / "in.json"
    path.write_text("\ufeff" + json.dumps(RECORDS + [[1], "x"], indent=indent), encoding="utf-8")
    got = records_or_errors([str(path)])
    assert [loc for loc, _ in got] == [f"in.json:item {i}" for i in range(9)] and count_records([str(path)]) == 9
    assert [r for _, r in got[:7]] == RECORDS
    assert [str(e) for _, e in got[7:]] == [
        "in.json:item 7: expected a JSON object, got an array",
        "in.json:item 8: expected a JSON object, got a string",
    ]


def test_json_file_of_lines_is_jsonl_and_a_broken_array_is_a_file_error(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert [r for _, r in records_or_errors([str(lines)])] == RECORDS
    broken = tmp_path / "broken.json"
    broken.write_text("[\n" + json.dumps(RECORDS[0]) + ",\n" + '{"messages" []}\n]')
    with pytest.raises(
        DataError, match=r"broken.json: not a JSON array of objects \(Expecting ':' delimiter at line 3"
    ) as e:
        list(iter_records([str(broken)]))
    assert e.value.reason == "bad_file"


def test_parquet_folder_and_datasets_folder_read_in_shard_order(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(RECORDS[4:]), shards / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[:4]), shards / "train-00000-of-00002.parquet")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    for folder, first in (
        ("hub", "hub/data/train-00000-of-00002.parquet:row 0"),
        ("saved", "saved/data-00000-of-00002.arrow:row 0"),
    ):
        got = records_or_errors([str(tmp_path / folder)])
        assert [r for _, r in got] == RECORDS and got[0][0] == first
        assert count_records([str(tmp_path / folder)]) == len(RECORDS)
    with pytest.raises(DataError, match=r"dd: a DatasetDict folder \(splits: train; e.g. .*dd/train\)"):
        check_inputs([str(tmp_path / "dd")])
    state = tmp_path / "saved" / "state.json"
    state.write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    with pytest.raises(DataError, match="state.json: '_data_files' must list the folder's Arrow file names"):
        check_inputs([str(tmp_path / "saved")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: a folder with neither Parquet files nor a datasets state.json"):
        check_inputs([str(tmp_path / "empty")])
