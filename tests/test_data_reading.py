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
