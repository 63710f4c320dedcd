"""The two converter command-line tools: round trip, TP=2 -> TP=1, generation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_focusft.models.random_hf import make_random_hf_checkpoint
from tests.models import gqa_arch
from tools import convert_hf_to_megatron, convert_megatron_to_hf


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory) -> Path:
    """A sharded bf16 HF checkpoint (untied, GQA 3) with tokenizer files."""
    d = tmp_path_factory.mktemp("hf")
    make_random_hf_checkpoint(gqa_arch(3, tied=False), d, seed=3, dtype=torch.bfloat16, max_shard_size="60KB")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return d


def test_round_trip_is_bit_identical_and_tp2_checkpoint_verifies_at_tp1(hf_bf16, tmp_path, capsys):
    mg, back = tmp_path / "mg", tmp_path / "back"
    # Written by 2 tensor-parallel ranks; --verify loads it at TP=1 and compares with transformers.
    rc = convert_hf_to_megatron.main(
        [
            "--hf-dir",
            str(hf_bf16),
            "--out",
            str(mg),
            "--tp",
            "2",
            "--dtype",
            "bf16",
            "--verify",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "argmax identical: True -> OK" in out
    assert (mg / "tokenizer" / "tokenizer_config.json").exists()

    assert convert_megatron_to_hf.main(["--ckpt", str(mg), "--out", str(back), "--no-progress"]) == 0
    ref, ours = _tensors(hf_bf16), _tensors(back)
    assert sorted(ref) == sorted(ours)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name
    assert json.loads((back / "config.json").read_text())["num_key_value_heads"] == 2
    assert (back / "tokenizer_config.json").exists()

    # The exported folder is an ordinary transformers model that generates like the original.
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([[5, 17, 42, 7]])
    gen = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).generate(
            prompt, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        for d in (hf_bf16, back)
    ]
    assert gen[0].shape == (1, 12) and torch.equal(gen[0], gen[1])


def test_multi_shard_export_writes_an_index(hf_bf16, tmp_path):
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert convert_hf_to_megatron.main(["--hf-dir", str(hf_bf16), "--out", str(mg), "--no-progress"]) == 0
    args = ["--ckpt", str(mg), "--out", str(back), "--max-shard-size-gb", "0.00005", "--no-progress"]
    assert convert_megatron_to_hf.main(args) == 0
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards == {p.name for p in back.glob("*.safetensors")}
    assert not list(back.glob("*.tmp"))


def _bad(tmp_path: Path, hf_bf16: Path, how: str) -> Path:
    import shutil

    d = tmp_path / f"bad-{how}"
    shutil.copytree(hf_bf16, d)
    cfg = json.loads((d / "config.json").read_text())
    if how == "missing-config":
        (d / "config.json").unlink()
    elif how == "unreadable-config":
        (d / "config.json").write_text("{not json")
    elif how == "llama":
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "wrong-shape":
        cfg["intermediate_size"] = 100  # every mlp tensor now disagrees with the config
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "how, tp, message",
    [
        ("missing-config", 1, "config.json: no such file"),
        ("unreadable-config", 1, "config.json: unreadable"),
        ("llama", 1, "is not a Qwen2ForCausalLM checkpoint"),
        ("wrong-shape", 1, "gate_proj.weight' has shape (96, 96), config.json implies (100, 96)"),
        ("ok", 4, "tensor-parallel size 4 does not divide num_key_value_heads = 2"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_nothing(hf_bf16, tmp_path, capsys, how, tp, message):
    src = _bad(tmp_path, hf_bf16, how)
    out = tmp_path / "out"
    rc = convert_hf_to_megatron.main(["--hf-dir", str(src), "--out", str(out), "--tp", str(tp)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and err.startswith("error: ") and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_is_never_overwritten(hf_bf16, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = convert_hf_to_megatron.main(["--hf-dir", str(hf_bf16), "--out", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = convert_megatron_to_hf.main(["--ckpt", str(hf_bf16), "--out", str(out)])
    assert rc == 2 and "not a megatron_focusft checkpoint" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_failure_inside_the_write_leaves_no_partial_folder(tmp_path):
    from megatron_focusft.convert.megatron_io import atomic_output_dir

    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output_dir(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory) -> Path:
    """A single-file fp32 HF checkpoint with tied embeddings (as Qwen2.5-0.5B/1.5B/3B)."""
    d = tmp_path_factory.mktemp("hf-tied")
    make_random_hf_checkpoint(gqa_arch(3, tied=True), d, seed=5)
    assert "lm_head.weight" not in _tensors(d)
    return d


def _with_lm_head(tmp_path: Path, hf_tied: Path, how: str) -> Path:
    """A copy of ``hf_tied`` that also stores ``lm_head.weight``: a copy of the embedding ("equal", in the
    same file; "equal-sharded", in a second shard named by an index), or a different tensor ("different")."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / f"tied-{how}"
    shutil.copytree(hf_tied, d)
    tensors = load_file(d / "model.safetensors")
    head = tensors["model.embed_tokens.weight"].clone()
    if how == "different":
        head[3, 5] = torch.nextafter(head[3, 5], torch.tensor(1.0))  # one ulp apart in one element
    if how == "equal-sharded":
        save_file({"lm_head.weight": head}, d / "extra.safetensors", metadata={"format": "pt"})
        weight_map = {name: "model.safetensors" for name in tensors} | {"lm_head.weight": "extra.safetensors"}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**tensors, "lm_head.weight": head}, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("how", ["equal", "equal-sharded"])
def test_tied_checkpoint_with_an_identical_lm_head_converts(hf_tied, tmp_path, capsys, how):
    src = _with_lm_head(tmp_path, hf_tied, how)
    mg, back = tmp_path / "mg", tmp_path / "back"
    verify = ["--verify"] if how == "equal" else []  # (the sharded source holds the same tensors)
    rc = convert_hf_to_megatron.main(
        ["--hf-dir", str(src), "--out", str(mg), "--dtype", "fp32", *verify, "--no-progress"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert not verify or "argmax identical: True -> OK" in out.out
    assert convert_megatron_to_hf.main(["--ckpt", str(mg), "--out", str(back), "--no-progress"]) == 0
    ref, ours = _tensors(hf_tied), _tensors(back)
    assert sorted(ours) == sorted(ref)  # the tied export stores the embedding once
    assert all(torch.equal(ours[name], ref[name]) for name in ref)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(hf_tied, tmp_path, capsys):
    src = _with_lm_head(tmp_path, hf_tied, "different")
    out = tmp_path / "out"
    rc = convert_hf_to_megatron.main(["--hf-dir", str(src), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"{src / 'model.safetensors'}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight'" in err
    assert "tie_word_embeddings=true" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---- special-token ids: kept from the source config.json through conversion, training and export -------

# A base model ends with <|endoftext|>; an Instruct model with <|im_end|> (and here also names a pad id).
BASE_IDS = {"bos_token_id": 151643, "eos_token_id": 151643}
INSTRUCT_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}


def _hf_with_ids(root: Path, ids: dict) -> Path:
    """A tiny fp32 HF checkpoint whose config.json carries ``ids`` (and none of the other token-id keys)."""
    d = make_random_hf_checkpoint(gqa_arch(1, tied=False, vocab_size=300), root, seed=11)
    cfg = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if not k.endswith("_token_id")}
    (d / "config.json").write_text(json.dumps({**cfg, **ids}))
    return d


def _token_ids(config_path: Path) -> dict:
    return {k: v for k, v in json.loads(config_path.read_text()).items() if k.endswith("_token_id")}


@pytest.mark.parametrize("ids", [BASE_IDS, INSTRUCT_IDS], ids=["base", "instruct"])
def test_round_trip_keeps_the_source_token_ids(tmp_path, ids):
    src, mg, back = _hf_with_ids(tmp_path / "hf", ids), tmp_path / "mg", tmp_path / "back"
    assert (
        convert_hf_to_megatron.main(["--hf-dir", str(src), "--out", str(mg), "--dtype", "fp32", "--no-progress"]) == 0
    )
    hf_config = json.loads((mg / "focusft_checkpoint.json").read_text())["hf_config"]
    assert {k: v for k, v in hf_config.items() if k.endswith("_token_id")} == ids  # kept in the metadata
    assert convert_megatron_to_hf.main(["--ckpt", str(mg), "--out", str(back), "--no-progress"]) == 0
    assert _token_ids(back / "config.json") == ids


def test_metadata_written_before_token_ids_were_kept_still_exports(tmp_path):
    """An older focusft_checkpoint.json (its hf_config from ``to_hf_config`` without ids: none at a tiny
    vocabulary) reads and exports as before."""
    from megatron_focusft.convert.megatron_io import META_FILE, CheckpointMeta

    src, mg, back = _hf_with_ids(tmp_path / "hf", BASE_IDS), tmp_path / "mg", tmp_path / "back"
    assert (
        convert_hf_to_megatron.main(["--hf-dir", str(src), "--out", str(mg), "--dtype", "fp32", "--no-progress"]) == 0
    )
    raw = json.loads((mg / META_FILE).read_text())
    arch = CheckpointMeta.read(mg).arch
    (mg / META_FILE).write_text(json.dumps({**raw, "hf_config": arch.to_hf_config("float32")}))
    (mg / "checksums.json").unlink()  # those versions wrote no checksums either
    assert CheckpointMeta.read(mg).token_ids == {}
    assert convert_megatron_to_hf.main(["--ckpt", str(mg), "--out", str(back), "--no-progress"]) == 0
    assert _token_ids(back / "config.json") == {}
    assert torch.equal(_tensors(back)["lm_head.weight"], _tensors(src)["lm_head.weight"])


def test_training_checkpoints_carry_the_pretrained_token_ids(tmp_path):
    """tools/train.py from a converted base model: its checkpoints (converted later) and its --export-hf
    keep the base model's eos id."""
    from megatron_focusft import runtime
    from megatron_focusft.training import loop
    from tests.training_fixtures import tiny_dataset

    src, mg = _hf_with_ids(tmp_path / "hf", BASE_IDS), tmp_path / "mg"
    assert (
        convert_hf_to_megatron.main(["--hf-dir", str(src), "--out", str(mg), "--dtype", "fp32", "--no-progress"]) == 0
    )
    data = tiny_dataset(tmp_path / "data" / "train", num_docs=8)
    save, export = tmp_path / "run", tmp_path / "run-hf"
    argv = ["--pretrained-checkpoint", str(mg), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    argv += ["--global-batch-size", "1", "--focusft-lora-rank", "4", "--save", str(save), "--export-hf", str(export)]
    assert runtime.launch_cpu_processes(loop.main, 1, args=(argv,)) == 0
    assert _token_ids(export / "config.json") == BASE_IDS
    back = tmp_path / "back"
    assert convert_megatron_to_hf.main(["--ckpt", str(save), "--out", str(back), "--no-progress"]) == 0
    assert _token_ids(back / "config.json") == BASE_IDS
