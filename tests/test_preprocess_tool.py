"""tools/preprocess_data.py end to end: summary, stats, bad input under skip / fail, nothing partial."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from megatron_focusft.data.dataset import PackedDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", os.path.join(os.path.dirname(ROOT), "shared", "qwen2-tokenizer"))
if not os.path.isdir(QWEN2_DIR):
    QWEN2_DIR = "/work/shared/qwen2-tokenizer"


def load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GOOD = [
    {
        "messages": [
            {"role": "user", "content": f"Question {i}? " * (1 + i)},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }
    for i in range(12)
]
BAD_LINES = [
    "{not json",
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
    json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}),
]


def write_jsonl(path, records, bad=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in bad:
            f.write(line + "\n")


def run(tmp_path, *extra, inputs=None):
    out = tmp_path / "out" / "ds"
    stats = tmp_path / "stats.json"
    argv = [
        "--input",
        *(inputs or [str(tmp_path / "in.jsonl")]),
        "--tokenizer",
        QWEN2_DIR,
        "--added-tokens",
        "qwen2.5",
        "--renderer",
        "qwen2.5",
        "--out",
        str(out),
        "--pack-length",
        "256",
        "--stats-json",
        str(stats),
        "--no-progress",
        *extra,
    ]
    rc = load_tool().main(argv)
    return rc, out, (json.loads(stats.read_text()) if stats.exists() else None)


def test_skip_bad_records_and_report(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD, BAD_LINES)
    rc, out, stats = run(tmp_path, "--workers", "2")
    assert rc == 0
    assert stats["conversations_read"] == 16 and stats["conversations_emitted"] == 12
    assert stats["skipped"] == {
        "malformed_json": 1,
        "unknown_role": 1,
        "empty_assistant": 1,
        "orphan_tool": 1,
    }
    assert any(e.startswith("in.jsonl:13: malformed JSON") for e in stats["errors"])
    assert any(e.startswith("in.jsonl:15: message 1: assistant turn with empty content") for e in stats["errors"])
    assert 0 < stats["response_fraction"] < 1 and 0 < stats["packing_efficiency"] <= 1
    printed = capsys.readouterr()
    assert "packing efficiency" in printed.out and "in.jsonl:14: message 0: unknown role" in printed.err
    ds = PackedDataset(str(out))
    assert ds.meta["num_documents"] == 12 and len(ds) == stats["packs"]
    assert ds.meta["num_tokens"] == stats["tokens"]
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (256 * stats["packs"]))


def test_dataset_metadata_stats_equal_stats_json(tmp_path):
    """OUT.json's stats are the final ones (timing included), the same as --stats-json's."""
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, out, stats = run(tmp_path)
    assert rc == 0
    meta_stats = json.loads((tmp_path / "out" / "ds.json").read_text())["stats"]
    assert meta_stats == stats
    assert meta_stats["seconds"] > 0 and meta_stats["tokens_per_second"] > 0
    assert meta_stats["tokens_per_second"] == pytest.approx(meta_stats["tokens"] / meta_stats["seconds"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_invalid_utf8_line_is_skipped_and_counted(tmp_path, capsys, workers):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    with open(tmp_path / "in.jsonl", "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
        f.write((json.dumps(GOOD[0]) + "\n").encode())
    rc, out, stats = run(tmp_path, "--workers", workers)
    assert rc == 0
    assert stats["conversations_read"] == 14 and stats["conversations_emitted"] == 13
    assert stats["skipped"] == {"bad_encoding": 1}
    assert stats["errors"] == ["in.jsonl:13: invalid UTF-8 (byte 0xe9 at column 47: invalid continuation byte)"]
    assert "skipped: in.jsonl:13: invalid UTF-8" in capsys.readouterr().err
    assert PackedDataset(str(out)).meta["num_documents"] == 13
    rc, _, _ = run(tmp_path, "--on-error", "fail", "--overwrite")
    assert rc == 1
    assert "error: in.jsonl:13: invalid UTF-8 (byte 0xe9" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_wrong_field_types_and_unexpected_errors_are_located(tmp_path, capsys, workers):
    """A list role, a dict content, a JSON nesting that overflows the parser: skipped under skip (counted),
    named by location under fail; never a TypeError that aborts the run."""
    bad = [
        json.dumps({"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": {"text": "q"}}, {"role": "assistant", "content": "a"}]}),
        '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ]
    write_jsonl(tmp_path / "in.jsonl", GOOD, bad)
    rc, out, stats = run(tmp_path, "--workers", workers)
    assert rc == 0
    assert stats["conversations_read"] == 15 and stats["conversations_emitted"] == 12
    assert stats["skipped"] == {"bad_record": 2, "unexpected": 1}
    assert stats["errors"][0].startswith("in.jsonl:13: message 0: field 'role' must be a string")
    assert stats["errors"][1].startswith("in.jsonl:14: message 0: field 'content': content must be a string")
    assert stats["errors"][2].startswith("in.jsonl:15: unexpected RecursionError while encoding")
    assert PackedDataset(str(out)).meta["num_documents"] == 12
    capsys.readouterr()
    for k, line in enumerate(bad if workers == "1" else bad[:1]):  # (a pool per run is slow)
        write_jsonl(tmp_path / "in.jsonl", GOOD[:2], [line])
        rc, _, _ = run(tmp_path, "--on-error", "fail", "--workers", workers, "--overwrite")
        assert rc == 1
        assert f"error: in.jsonl:3: {stats['errors'][k].split(': ', 1)[1]}" in capsys.readouterr().err


def _worker_exits(chunk):
    os._exit(3)


def test_a_worker_that_dies_is_an_error_not_a_hang():
    """multiprocessing.Pool waits forever for a dead worker's chunk; the executor's broken pool is a DataError."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from megatron_focusft.data.errors import DataError
    from megatron_focusft.data.preprocess import _in_order

    with ProcessPoolExecutor(1, mp_context=get_context("forkserver")) as pool:
        with pytest.raises(DataError, match="a preprocessing worker died") as err:
            list(_in_order(pool, _worker_exits, [[1], [2], [3]], window=2))
    assert err.value.reason == "worker_died"


def test_fail_mode_exits_non_zero_and_leaves_nothing(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD, BAD_LINES[1:])
    rc, out, stats = run(tmp_path, "--on-error", "fail")
    assert rc == 1 and stats is None
    assert "in.jsonl:13: message 0: unknown role 'robot'" in capsys.readouterr().err
    assert os.listdir(out.parent) == []  # no .bin/.idx, no temporary folders


@pytest.mark.parametrize("kind", ["missing", "folder", "suffix", "fake_parquet", "fake_gzip"])
def test_bad_input_files_are_refused_up_front(tmp_path, capsys, kind):
    """Every input is checked before anything is read or written: exit 2, one line naming the file."""
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    bad = {
        "missing": tmp_path / "no-such-file.jsonl",
        "folder": tmp_path / "a-folder.jsonl",
        "suffix": tmp_path / "data.csv",
        "fake_parquet": tmp_path / "fake.parquet",
        "fake_gzip": tmp_path / "fake.jsonl.gz",
    }[kind]
    if kind == "folder":
        bad.mkdir()
    elif kind != "missing":
        bad.write_text(json.dumps(GOOD[0]) + "\n")
    rc, out, stats = run(tmp_path, inputs=[str(tmp_path / "in.jsonl"), str(bad)])  # the bad one second
    assert rc == 2 and stats is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert not out.parent.exists()


def test_out_must_be_a_prefix_not_a_folder(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", QWEN2_DIR, "--pack-length", "64"]
    with pytest.raises(SystemExit) as e:
        load_tool().main([*argv, "--out", str(tmp_path / "o") + os.sep])
    assert e.value.code == 2 and "--out is a prefix" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_library_checks_every_input_before_counting(tmp_path):
    from megatron_focusft.data.errors import DataError
    from megatron_focusft.data.preprocess import PreprocessConfig, preprocess
    from megatron_focusft.data.reading import count_records

    write_jsonl(tmp_path / "in.jsonl", GOOD)
    missing = str(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="gone.jsonl: input file does not exist") as e:
        count_records([str(tmp_path / "in.jsonl"), missing])
    assert e.value.reason == "bad_file"
    cfg = PreprocessConfig([str(tmp_path / "in.jsonl"), missing], QWEN2_DIR, str(tmp_path / "o" / "ds"), 256)
    with pytest.raises(DataError, match="gone.jsonl"):
        preprocess(cfg, log=lambda *a: None)
    assert not (tmp_path / "o").exists()


def test_failed_run_keeps_the_existing_dataset(tmp_path, capsys):
    """A run that fails (bad input, bad record under fail) leaves the dataset already at the prefix intact."""
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, out, _ = run(tmp_path)
    assert rc == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    rc, _, _ = run(tmp_path, "--overwrite", inputs=[str(tmp_path / "in.jsonl"), str(tmp_path / "missing.jsonl")])
    assert rc == 2
    write_jsonl(tmp_path / "in.jsonl", GOOD[:3], BAD_LINES[:1])
    rc, _, _ = run(tmp_path, "--on-error", "fail", "--overwrite")
    assert rc == 1
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # same files, same bytes
    assert PackedDataset(str(out)).meta["num_documents"] == len(GOOD)


def test_missing_tokenizer_and_overlong_policies(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    argv = [
        "--input",
        str(tmp_path / "in.jsonl"),
        "--tokenizer",
        str(tmp_path / "no-such-dir"),
        "--out",
        str(tmp_path / "o" / "x"),
        "--pack-length",
        "64",
    ]
    assert load_tool().main(argv) == 1
    assert "no-such-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    long = [{"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    write_jsonl(tmp_path / "in.jsonl", GOOD + long)
    rc, out, stats = run(tmp_path)  # drop (default)
    assert rc == 0 and stats["skipped"] == {"too_long": 1} and stats["conversations_emitted"] == 12
    rc, out, stats = run(tmp_path, "--overlong", "error", "--on-error", "fail", "--overwrite")
    assert rc == 1


def test_parquet_input_and_cli(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": r["messages"]} for r in GOOD[:5]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "cli" / "ds"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "preprocess_data.py"),
            "--input",
            str(tmp_path / "in.parquet"),
            "--tokenizer",
            QWEN2_DIR,
            "--added-tokens",
            "qwen2.5",
            "--renderer",
            "qwen2.5",
            "--out",
            str(out),
            "--pack-length",
            "512",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conversations read     5" in proc.stdout and "100%" in proc.stderr  # tqdm progress bar
    assert PackedDataset(str(out)).meta["num_documents"] == 5


def test_cli_error_starts_its_own_line_after_the_progress_bar(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", GOOD, BAD_LINES[1:2])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "preprocess_data.py"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--tokenizer",
            QWEN2_DIR,
            "--added-tokens",
            "qwen2.5",
            "--renderer",
            "qwen2.5",
            "--out",
            str(tmp_path / "o" / "ds"),
            "--pack-length",
            "256",
            "--on-error",
            "fail",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert "conv/s" in proc.stderr  # the bar was shown, and closed before the error
    assert any(line.startswith("error: in.jsonl:13: message 0: unknown role 'robot'") for line in lines), lines
    assert lines[-1] == "nothing was written"
    assert os.listdir(tmp_path / "o") == []


def test_all_skipped_error_lists_each_reason_with_count_and_first_location(tmp_path, capsys):
    """Every record skipped: the error names each reason, how many it skipped and where the first one is."""
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "a"}]})
    write_jsonl(tmp_path / "in.jsonl", [], [long, BAD_LINES[0], long, BAD_LINES[1], BAD_LINES[0], BAD_LINES[0]])
    rc, out, stats = run(tmp_path)
    assert rc == 1 and stats is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == (
        "error: no conversation left to write: all 6 were skipped (malformed_json: 3, first at in.jsonl:2; "
        "too_long: 2, first at in.jsonl:1; unknown_role: 1, first at in.jsonl:4)"
    ), err
    assert err[-1] == "nothing was written"
    assert os.listdir(out.parent) == []
    (tmp_path / "in.jsonl").write_text("\n\n")
    rc, _, _ = run(tmp_path)
    assert rc == 1
    assert "error: no conversation left to write (the inputs hold no records)" in capsys.readouterr().err


# ------------------------------------------------------------------ the output, the stats file, corrupt files
def snapshot(folder):
    """Every file under ``folder``: name -> (bytes, modification time), to show nothing was touched."""
    return {
        os.path.relpath(os.path.join(d, f), folder): (
            open(os.path.join(d, f), "rb").read(),
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, files in os.walk(folder)
        for f in files
    }


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in err
    return lines[0]


def test_existing_dataset_is_refused_unless_overwrite(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, out, _ = run(tmp_path)
    assert rc == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    write_jsonl(tmp_path / "in.jsonl", GOOD[:3])
    after_input = snapshot(tmp_path)
    rc, _, _ = run(tmp_path)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "ds.bin" in line and "--overwrite" in line
    assert snapshot(tmp_path) == after_input  # the dataset, the stats file, no temporary folder: untouched
    assert {k: v for k, v in after_input.items() if k != "in.jsonl"} == {
        k: v for k, v in before.items() if k != "in.jsonl"
    }
    # any one file of a dataset is enough to refuse
    for name in ("ds.bin", "ds.idx", "ds.loss_mask.bin", "ds.loss_mask.idx"):
        os.remove(out.parent / name)
    rc, _, _ = run(tmp_path)
    assert rc == 2 and "ds.json" in one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(out.parent)) == ["ds.json"]
    rc, out, stats = run(tmp_path, "--overwrite")
    assert rc == 0 and stats["conversations_emitted"] == 3
    assert PackedDataset(str(out)).meta["num_documents"] == 3


def test_stats_json_into_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    stats = tmp_path / "no-such-folder" / "stats.json"
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", QWEN2_DIR, "--out", str(tmp_path / "o" / "ds")]
    assert load_tool().main([*argv, "--pack-length", "256", "--stats-json", str(stats), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(stats) in line and "does not exist" in line
    assert not (tmp_path / "o").exists() and not stats.parent.exists()
    (tmp_path / "a-folder.json").mkdir()
    assert load_tool().main([*argv, "--pack-length", "256", "--stats-json", str(tmp_path / "a-folder.json")]) == 2
    assert "a-folder.json: is a folder" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_read_only_out_folder_is_one_line_error(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    folder = tmp_path / "out"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a read-only folder anyway: refuse the writes as the kernel would
        real_mkdir, real_open = os.mkdir, os.open

        def inside(path):
            return os.path.abspath(os.fspath(path)).startswith(str(folder) + os.sep)

        def mkdir(path, *a, **k):
            if inside(path):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_mkdir(path, *a, **k)

        def open_(path, flags, *a, **k):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
    try:
        rc, out, stats = run(tmp_path)
    finally:
        folder.chmod(0o755)
    assert rc == 2 and stats is None
    line = one_error_line(capsys.readouterr().err)
    assert str(folder) in line and ("Permission denied" in line or "not writable" in line), line
    assert os.listdir(folder) == []


def test_full_disk_is_one_line_error_and_keeps_the_dataset(tmp_path):
    """A real write failure: the tool runs with a file-size limit (RLIMIT_FSIZE; CPython ignores SIGXFSZ, so
    a write past it fails with EFBIG, as a full disk fails with ENOSPC) over an existing dataset."""
    import resource

    write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, out, _ = run(tmp_path)
    assert rc == 0
    before = snapshot(out.parent)
    many = [
        {"messages": [{"role": "user", "content": f"q {i} " * 30}, {"role": "assistant", "content": "a"}]}
        for i in range(2000)
    ]
    write_jsonl(tmp_path / "big.jsonl", many)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    argv = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(tmp_path / "big.jsonl")]
    argv += [
        "--tokenizer",
        QWEN2_DIR,
        "--added-tokens",
        "qwen2.5",
        "--renderer",
        "qwen2.5",
        "--out",
        str(out),
        "--pack-length",
        "256",
    ]
    proc = subprocess.run(
        [*argv, "--no-progress", "--overwrite"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"},
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert str(out.parent) in line and "File too large" in line and "nothing was written" in line, line
    assert snapshot(out.parent) == before  # the old dataset, byte for byte; no temporary folder left


def test_disk_full_while_writing_the_metadata_keeps_the_dataset(tmp_path, capsys, monkeypatch):
    import errno

    from megatron_focusft.data import dataset

    write_jsonl(tmp_path / "in.jsonl", GOOD)
    rc, out, _ = run(tmp_path)
    assert rc == 0
    before = snapshot(out.parent)
    capsys.readouterr()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dataset.json, "dump", no_space)
    rc, _, _ = run(tmp_path, "--overwrite")
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out.parent) in line and "No space left on device" in line
    assert snapshot(out.parent) == before


@pytest.mark.parametrize("kind", ["truncated_gzip", "corrupt_parquet"])
def test_corrupt_input_file_is_one_line_error(tmp_path, capsys, kind):
    import gzip

    lines = "".join(json.dumps(r) + "\n" for r in GOOD * 50).encode()
    if kind == "truncated_gzip":
        path = tmp_path / "in.jsonl.gz"
        data = gzip.compress(lines)
        path.write_bytes(data[: len(data) // 2])
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(GOOD * 50), path, row_group_size=100, compression="none")
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 2000):  # the footer (row counts, schema) stays intact
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    rc, out, stats = run(tmp_path, inputs=[str(path)])
    assert rc == 2 and stats is None
    line = one_error_line(capsys.readouterr().err)
    assert path.name in line and "cannot read" in line, line
    assert not out.parent.exists() or os.listdir(out.parent) == []


CORRUPT_TOKENIZERS = {
    # name: (files written into the folder, the file the error must name)
    "tokenizer.json truncated": ({"tokenizer.json": lambda b: b[: len(b) // 2]}, "tokenizer.json"),
    "tokenizer.json bytes flipped": ({"tokenizer.json": lambda b: b[:5000] + b"\xff\xfe" + b[5002:]}, "tokenizer.json"),
    "tokenizer.json not an object": ({"tokenizer.json": lambda b: b"[1, 2, 3]"}, "tokenizer.json"),
    "vocab.json truncated": ({"vocab.json": lambda b: b[: len(b) // 3], "merges.txt": None}, "vocab.json"),
    "merges.txt garbage": ({"vocab.json": None, "merges.txt": lambda b: b[:100000] + b"\nzzqx qqzx\n"}, "merges.txt"),
    "tokenizer_config.json truncated": (
        {"tokenizer.json": None, "tokenizer_config.json": lambda b: b'{"chat_template": "{% for m in'},
        "tokenizer_config.json",
    ),
    "chat template does not compile": (
        {"tokenizer.json": None, "chat_template.jinja": lambda b: b"{% for m in messages %}{{ m.content }"},
        "chat_template.jinja",
    ),
    "chat_template.jinja not UTF-8": (
        {"tokenizer.json": None, "chat_template.jinja": lambda b: b"{{ messages }}\xff\xfe"},
        "chat_template.jinja",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT_TOKENIZERS))
def test_corrupt_tokenizer_file_is_one_line_error_naming_it(tmp_path, capsys, case):
    """A truncated or corrupt file of the --tokenizer folder: exit 1, one error line naming the file, no
    traceback, nothing written."""
    files, named = CORRUPT_TOKENIZERS[case]
    folder = tmp_path / "tok"
    folder.mkdir()
    for name, corrupt in files.items():
        src = os.path.join(QWEN2_DIR, name)
        original = open(src, "rb").read() if os.path.exists(src) else b""
        (folder / name).write_bytes(original if corrupt is None else corrupt(original))
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(folder), "--out", str(tmp_path / "o" / "ds")]
    assert load_tool().main([*argv, "--pack-length", "256", "--renderer", "auto", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "nothing was written", lines
    assert lines[0].startswith(f"error: {folder / named}: "), lines
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ huge records
HUGE_RUN = r"""
import importlib.util, json, os, sys, time

def status(key):  # kB, from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

path = os.path.join(sys.argv[1], "tools", "preprocess_data.py")
spec = importlib.util.spec_from_file_location("preprocess_data", path)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
work, tokenizer, name = sys.argv[2], sys.argv[3], sys.argv[4]
common = ["--tokenizer", tokenizer, "--added-tokens", "qwen2.5", "--renderer", "qwen2.5", "--pack-length", "256"]
common += ["--no-progress"]
assert tool.main(["--input", f"{work}/small.jsonl", "--out", f"{work}/warm-{name}/ds", *common]) == 0  # imports
extra = ["--overlong", "truncate"] if name == "truncate" else []
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak RSS (VmHWM) from now
before = status("VmRSS")
t0 = time.perf_counter()
argv = ["--input", f"{work}/{name}.jsonl", "--out", f"{work}/{name}/ds", "--stats-json", f"{work}/{name}.json"]
rc = tool.main([*argv, *common, *extra])
result = {"rc": rc, "seconds": time.perf_counter() - t0, "peak_growth_mb": (status("VmHWM") - before) / 1024}
print("RESULT " + json.dumps(result))
"""


def test_huge_record_is_rejected_before_tokenising_in_bounded_time_and_memory(tmp_path):
    """A 50 MB JSONL line among normal records (issue: a 5 MB line took 26 s and 1.7 GB before being dropped,
    a 50 MB one ran past 5 minutes at 6 GB): rejected from its length alone, with its location in the skip
    report, in seconds and without tokenising it; under --overlong truncate its first turn is kept."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(5000)]
    block = " ".join(rng.choice(words) for _ in range(170_000))  # ~1 MB of varied words
    huge = (block + " ") * 50
    assert len(huge) > 50_000_000
    write_jsonl(tmp_path / "small.jsonl", GOOD)
    huge_drop = {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(tmp_path / "drop.jsonl", GOOD[:5] + [huge_drop] + GOOD[5:])
    huge_truncate = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": huge},
            {"role": "assistant", "content": "ok"},
        ]
    }
    write_jsonl(tmp_path / "truncate.jsonl", GOOD[:5] + [huge_truncate] + GOOD[5:])
    del huge, huge_drop, huge_truncate
    assert (tmp_path / "drop.jsonl").stat().st_size > 50_000_000
    result, stderr = {}, {}
    for name in ("drop", "truncate"):  # each in a fresh process, so that one's memory is not the other's
        proc = subprocess.run(
            [sys.executable, "-c", HUGE_RUN, ROOT, str(tmp_path), QWEN2_DIR, name],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result[name] = json.loads(proc.stdout.split("RESULT ", 1)[1])
        stderr[name] = proc.stderr
    print(result)  # (shown with -s: the time and peak memory growth of each run)
    drop = json.loads((tmp_path / "drop.json").read_text())
    assert result["drop"]["rc"] == 0
    assert drop["conversations_read"] == 13 and drop["conversations_emitted"] == 12
    assert drop["skipped"] == {"too_long": 1} and drop["first_skipped"] == {"too_long": "drop.jsonl:6"}
    (error,) = drop["errors"]
    n_chars = int(error.split(": ")[1].split(" ")[0])
    assert n_chars > len(block) * 50  # the rendered conversation
    assert error == (
        f"drop.jsonl:6: {n_chars} characters, so at least {-(-n_chars // 128)} tokens, longer than the pack "
        "length 256 (not tokenised)"
    )
    assert "skipped: drop.jsonl:6: " in stderr["drop"]
    truncate = json.loads((tmp_path / "truncate.json").read_text())
    assert result["truncate"]["rc"] == 0
    assert truncate["conversations_emitted"] == 13 and truncate["truncated"] == 1 and truncate["skipped"] == {}
    for name in ("drop", "truncate"):
        assert result[name]["seconds"] < 30, result
        assert result[name]["peak_growth_mb"] < 1024, result


def test_warnings_are_said_once_before_the_run(tmp_path, capsys):
    """No chat template (the built-in renderer and its default system prompt) and added tokens beyond Qwen2.5's:
    each said once, before the run (by the main process; workers only encode), and kept in the stats."""
    from megatron_focusft.data.tokenizer import added_token_warning, load_tokenizer

    write_jsonl(tmp_path / "in.jsonl", GOOD)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", QWEN2_DIR, "--out", str(tmp_path / "o" / "ds")]
    argv += ["--pack-length", "256", "--no-progress", "--stats-json", str(tmp_path / "s.json")]
    assert load_tool().main(argv) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, printed.err
    assert f"warning: {QWEN2_DIR}: no chat template" in warnings[0] and "default system prompt" in warnings[0]
    assert "adds 4 tokens after Qwen2.5's 22 (151665 '<tool_response>', 151666 '</tool_response>'" in warnings[1]
    assert "--added-tokens qwen2.5" in warnings[1]
    assert json.loads((tmp_path / "s.json").read_text())["warnings"] == [w[len("warning: ") :] for w in warnings]
    assert "warnings               2" in printed.out
    # told the model's vocabulary: the tokens past it are named; Qwen2.5's own 151,665 tokens: nothing to say
    qwen3_era = load_tokenizer(QWEN2_DIR)
    assert "ids from 151665 on (151665 '<tool_response>'" in added_token_warning(qwen3_era, 151665)
    assert added_token_warning(qwen3_era, 151669) is None
