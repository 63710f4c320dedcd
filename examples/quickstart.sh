#!/usr/bin/env bash
# The CPU quickstart: the whole FocuSFT pipeline on a tiny model, on a laptop CPU, in a few minutes.
#
#   bash examples/quickstart.sh [WORKDIR]        (default WORKDIR: ./quickstart-run; must not exist)
#
# 1. installs what it needs (torch if missing, this package)
# 2. writes a synthetic long-context, multi-turn retrieval data set and a tiny tokenizer trained on it
# 3. makes a tiny random Qwen2 checkpoint (Hugging Face format) and converts it to Megatron-Core (TP=2)
# 4. renders, tokenises and packs the conversations (loss masks, context/response blocks)
# 5. trains with FocuSFT (bilevel, glm mask) on 2 CPU processes (TP=2 + sequence parallel), stops and
#    saves halfway (--exit-interval), resumes from the checkpoint, and exports to Hugging Face at the end
# 6. generates with transformers from the export, analyses attention and runs the long-context tasks
#
# Set QUICKSTART_ITERS (default 60) for a shorter or longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-quickstart-run}
ITERS=${QUICKSTART_ITERS:-60}
HALF=$((ITERS / 2))
if [ -e "$WORK" ]; then echo "error: $WORK already exists; pass a new folder" >&2; exit 2; fi
# A torch already installed is kept (PyPI's default Linux wheel of torch is the large CUDA build).
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[analysis,tensorboard]"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
mkdir -p "$WORK"

echo "== 1. synthetic data: haystacks with hidden facts, a lookup tool call, a question; a tiny tokenizer"
python3 tools/make_synthetic_data.py --out "$WORK/data/train.jsonl" --num-conversations 400 \
  --context-tokens 400 --seed 0 --write-tokenizer "$WORK/tokenizer"

echo "== 2. a tiny random Qwen2 (Hugging Face format) -> Megatron-Core, written by 2 TP ranks, logits verified"
python3 tools/make_random_checkpoint.py --preset tiny --out "$WORK/hf" --tokenizer "$WORK/tokenizer"
python3 tools/convert_hf_to_megatron.py --hf-dir "$WORK/hf" --out "$WORK/megatron" --tp 2 --dtype fp32 --verify

echo "== 3. render, tokenise and pack into 2048-token sequences"
python3 tools/preprocess_data.py --input "$WORK/data/train.jsonl" --tokenizer "$WORK/tokenizer" \
  --out "$WORK/data/train" --pack-length 2048 --stats-json "$WORK/data/stats.json" --no-progress \
  --renderer qwen2.5  # (the tiny tokenizer has no chat template: the built-in Qwen2.5 renderer, chosen)

TRAIN=(tools/train.py --device cpu --pretrained-checkpoint "$WORK/megatron" --data-path "$WORK/data/train"
  --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --global-batch-size 4
  --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-fraction 0.1 --lr-decay-style cosine
  --weight-decay 0.01 --clip-grad 1.0 --bilevel --attention-mask glm --focusft-inner-steps 2
  --focusft-inner-lr 1.0 --focusft-lora-rank 8 --focusft-lora-alpha 16 --log-interval 5 --no-progress
  --save "$WORK/run" --load "$WORK/run" --save-interval 10 --tensorboard-dir "$WORK/tensorboard")

echo "== 4. FocuSFT training on 2 processes (TP=2, SP); stops and saves at iteration $HALF"
torchrun --standalone --nproc-per-node 2 "${TRAIN[@]}" --exit-interval "$HALF" | tee "$WORK/train-1.log"

echo "== 5. resume from the checkpoint in $WORK/run and finish; export to Hugging Face"
torchrun --standalone --nproc-per-node 2 "${TRAIN[@]}" --export-hf "$WORK/hf-trained" | tee "$WORK/train-2.log"

python3 - "$WORK/train-1.log" "$WORK/train-2.log" <<'PY'
import re, sys
losses = [float(m.group(1)) for f in sys.argv[1:] for m in re.finditer(r"\| loss ([0-9.]+)", open(f).read())]
first, last = losses[0], min(losses[-3:])
print(f"response loss: {first:.3f} at the first log line -> {last:.3f} at the end")
if not last < 0.7 * first:
    sys.exit("error: the loss did not clearly drop")
PY

echo "== 6. generate with transformers from the exported folder: a held-out question after its long context"
python3 tools/make_synthetic_data.py --out "$WORK/data/heldout.jsonl" --num-conversations 3 --context-tokens 400 --seed 99
python3 - "$WORK/hf-trained" "$WORK/data/heldout.jsonl" "$WORK/tokenizer" <<'PY'
import json, sys, torch
from transformers import AutoModelForCausalLM
from megatron_focusft.data.chat import ChatEncoder
from megatron_focusft.data.tokenizer import load_tokenizer
folder, data, tokenizer_dir = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = load_tokenizer(tokenizer_dir)
encoder = ChatEncoder(tokenizer, renderer="qwen2.5")
for line in open(data):
    conv = json.loads(line)
    doc = encoder.encode(conv)
    start = len(doc.loss_mask) - int(doc.loss_mask[::-1].argmin())  # the last response block begins here
    prompt = torch.tensor(doc.input_ids[:start], dtype=torch.long)[None]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_id)
    answer = tokenizer.decode(out[0, prompt.shape[1]:].tolist()).split("<|im_end|>")[0]
    print(f"Q: {conv['messages'][-2]['content']}  expected: {conv['messages'][-1]['content']!r}  model: {answer!r}")
PY

echo "== 7. attention analysis (standard causal vs glm view of the trained model) and long-context tasks"
python3 tools/analyze_attention.py --ckpt "$WORK/run" --tokenizer "$WORK/tokenizer" --data "$WORK/data/train" \
  --samples 2 --compare "$WORK/run" --compare-attention-mask glm --json "$WORK/attention.json" --plots "$WORK/plots"
python3 tools/evaluate.py --ckpt "$WORK/run" --tokenizer "$WORK/tokenizer" --tasks babilong_qa1,ruler_niah_mv \
  --lengths 1k --samples 2 --max-new-tokens 8 --json "$WORK/eval.json" --markdown "$WORK/eval.md"
echo "== done: outputs in $WORK (tensorboard --logdir $WORK/tensorboard)"
