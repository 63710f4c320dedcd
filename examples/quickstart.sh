#!/usr/bin/env bash
# The CPU quickstart: installs what it needs, then runs the pipeline that exists so far on a tiny model.
#   bash examples/quickstart.sh [WORKDIR]        (default WORKDIR: ./quickstart-run, must not exist)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-quickstart-run}
if [ -e "$WORK" ]; then echo "error: $WORK already exists; pass a new folder" >&2; exit 2; fi
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
export PYTHONWARNINGS=ignore

echo "== 1. a tiny random Qwen2 checkpoint in Hugging Face format"
python3 tools/make_random_checkpoint.py --preset tiny --out "$WORK/hf"

echo "== 2. Hugging Face -> Megatron-Core (written by 2 tensor-parallel ranks), logits checked at TP=1"
python3 tools/convert_hf_to_megatron.py --hf-dir "$WORK/hf" --out "$WORK/megatron" --tp 2 --dtype fp32 --verify

echo "== 3. Megatron-Core -> Hugging Face"
python3 tools/convert_megatron_to_hf.py --ckpt "$WORK/megatron" --out "$WORK/hf-export"

echo "== 4. generate with transformers from the exported folder"
python3 - "$WORK/hf-export" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
print("generated token ids:", out[0].tolist())
PY
echo "== 5. attention analysis and offline long-context evaluation (needs a Qwen2 tokenizer folder)"
TOKENIZER=${QWEN2_TOKENIZER_DIR:-../shared/qwen2-tokenizer}
if [ -f "$TOKENIZER/vocab.json" ] || [ -f "$TOKENIZER/tokenizer.json" ]; then
  python3 -m pip install -q "matplotlib>=3.7"
  python3 - "$WORK/convs.jsonl" <<'PY'
import json, sys
conv = {"messages": [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": "Is it raining in Paris?"},
    {"role": "assistant", "tool_calls": [{"name": "search", "arguments": {"q": "Paris weather"}}]},
    {"role": "tool", "content": "Paris: light rain, 12 C."},
    {"role": "assistant", "content": "Yes, there is light rain in Paris."}]}
open(sys.argv[1], "w").write(json.dumps(conv) + "\n")
PY
  python3 tools/analyze_attention.py --ckpt "$WORK/megatron" --tokenizer "$TOKENIZER" --data "$WORK/convs.jsonl" \
    --compare "$WORK/megatron" --compare-attention-mask glm --tp 2 --json "$WORK/attention.json" --plots "$WORK/plots"
  python3 tools/evaluate.py --ckpt "$WORK/megatron" --tokenizer "$TOKENIZER" --tasks babilong_qa1,ruler_cwe \
    --lengths 1k,2k --samples 2 --max-new-tokens 8 --tp 2 --json "$WORK/eval.json" --markdown "$WORK/eval.md"
  python3 tools/evaluate.py --hf-dir "$WORK/hf-export" --tokenizer "$TOKENIZER" --tasks babilong_qa1,ruler_cwe \
    --lengths 1k,2k --samples 2 --max-new-tokens 8 --json "$WORK/eval-hf.json"
else
  echo "skipped: no tokenizer at $TOKENIZER (set QWEN2_TOKENIZER_DIR)"
fi
echo "== done: outputs in $WORK"
