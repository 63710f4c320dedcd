#!/usr/bin/env bash
# The GPU-only checks and figures, in parts that each fit one 10-minute call on one H100/H200.
#
#   bash tools/gpu_checks.sh PART [OUT]      PART: tests | attention | step | train | all
#
#   tests      pytest -m gpu: flex forward/backward vs dense (fp32, bf16), flex memory linear to 32K,
#              the memory plan vs torch.cuda peaks                                      (issues 4, 8)
#   attention  one attention layer, causal vs glm, flex vs SDPA (flash), 4K-64K, bf16     (issue 4)
#   step       the 2x2 ablation on a random Qwen2.5-1.5B, bf16, 4K-32K: tokens/s, MFU, FocuSFT / SFT,
#              measured peak next to the memory plan                                  (issues 5, 8)
#   train      tools/train.py --device cuda --bf16 (Megatron's distributed optimizer, grad reduce
#              overlapped with backward, flex attention) on a small random model: stop halfway, resume,
#              export to Hugging Face; the loss must drop                                   (issue 6)
#
# Everything is written under OUT (default: gpu-results), one log per part.  Megatron-Core is not in the
# GPU image: when a .whl/ folder is here (see BENCHMARKS.md, "Running the GPU checks") its wheels are
# installed into /tmp/site first.  The figures go into BENCHMARKS.md by hand, with date, device and command.
# DEVICE=cpu runs the train part's plumbing on a CPU (fp32, dense attention) without a GPU.
# PYTHON is the interpreter of every step, torchrun included (default: python3 from PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bash tools/gpu_checks.sh tests|attention|step|train|all [OUT]}
OUT=${2:-gpu-results}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
case "$PART" in
  tests | attention | step | train | all) ;;
  *) echo "error: unknown part '$PART' (tests, attention, step, train, all)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -d .whl ] && ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c "import torch, sys; torch.cuda.is_available() or sys.exit('error: no CUDA device (DEVICE=cpu for the train part)')
print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
fi

tests() {
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gpu.py tests/test_memory_plan.py 2>&1 |
    tee "$OUT/tests.log"
}

attention() {
  "$PYTHON" tools/benchmark_attention.py --lengths 4k,16k,32k,64k --masks causal,glm --backend flex,sdpa \
    --heads 28 --kv-heads 4 --head-dim 128 --dtype bf16 --device cuda 2>&1 | tee "$OUT/attention.md"
}

step() {
  "$PYTHON" tools/benchmark.py --preset qwen2.5-1.5b --seq-length 4k,8k,16k,32k --device cuda --dtype bf16 \
    --warmup 2 --iters 5 2>&1 | tee "$OUT/step.md"
}

train() {
  local work=$OUT/train
  rm -rf "$work"
  "$PYTHON" tools/make_synthetic_data.py --out "$work/data/train.jsonl" --num-conversations 400 \
    --context-tokens 400 --seed 0 --write-tokenizer "$work/tokenizer"
  "$PYTHON" tools/make_random_checkpoint.py --preset tiny --out "$work/hf" --tokenizer "$work/tokenizer"
  "$PYTHON" tools/convert_hf_to_megatron.py --hf-dir "$work/hf" --out "$work/megatron" --tp 1 --dtype bf16 --no-progress
  "$PYTHON" tools/preprocess_data.py --input "$work/data/train.jsonl" --tokenizer "$work/tokenizer" \
    --out "$work/data/train" --pack-length 2048 --no-progress
  local precision=(--bf16 --attention-backend flex)
  [ "$DEVICE" = cuda ] || precision=(--attention-backend dense)
  local run=(tools/train.py --device "$DEVICE" "${precision[@]}" --pretrained-checkpoint "$work/megatron"
    --data-path "$work/data/train" --micro-batch-size 1 --global-batch-size 4 --train-iters 40 --lr 3e-3
    --min-lr 3e-4 --lr-warmup-fraction 0.1 --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0
    --bilevel --attention-mask glm --focusft-lora-rank 8 --focusft-lora-alpha 16 --log-interval 5
    --no-progress --save "$work/run" --load "$work/run" --save-interval 10)
  local torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1)  # torchrun, on $PYTHON
  "${torchrun[@]}" "${run[@]}" --exit-interval 20 2>&1 | tee "$OUT/train-1.log"
  "${torchrun[@]}" "${run[@]}" --export-hf "$work/hf-trained" 2>&1 | tee "$OUT/train-2.log"
  "$PYTHON" tools/convert_megatron_to_hf.py --ckpt "$work/run" --out "$work/hf-from-checkpoint" --no-progress
  "$PYTHON" - "$OUT/train-1.log" "$OUT/train-2.log" <<'PY'
import re, sys
losses = [float(m.group(1)) for f in sys.argv[1:] for m in re.finditer(r"\| loss ([0-9.]+)", open(f).read())]
print(f"response loss {losses[0]:.3f} -> {min(losses[-3:]):.3f} over {len(losses)} log lines")
if not min(losses[-3:]) < 0.7 * losses[0]:
    sys.exit("error: the loss did not clearly drop")
PY
}

if [ "$PART" = all ]; then tests; attention; step; train; else "$PART"; fi
