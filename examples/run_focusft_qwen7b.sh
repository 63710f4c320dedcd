#!/usr/bin/env bash
#SBATCH --job-name=focusft-qwen7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# FocuSFT (bilevel long-context SFT) of Qwen2.5-7B with Megatron-Core: under SLURM one srun task per GPU
# (8 per node, no torchrun: RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID);
# without SLURM one torchrun --standalone here.
#
#   sbatch examples/run_focusft_qwen7b.sh                          # the paper's 4K recipe on 1 node
#   SCALE=32k sbatch --nodes=2 examples/run_focusft_qwen7b.sh      # 32K context (TP=4, CP=2, SP, selective)
#   SCALE=128k sbatch --nodes=4 examples/run_focusft_qwen7b.sh     # 128K context (TP=4, CP=8, SP, selective)
#   DRY_RUN=1 bash examples/run_focusft_qwen7b.sh                  # print the commands, run nothing
#   bash examples/run_focusft_qwen7b.sh                            # no SLURM: torchrun --standalone here
#
# Submit from the repository root (SLURM runs a copy of this script; the repository is $SLURM_SUBMIT_DIR),
# or set REPO_DIR.  The run resumes by itself: --load and --save are both $SAVE_DIR, and tools/train.py
# continues from the latest checkpoint there when one exists (so a requeued / resubmitted job goes on).
#
# Pre-emption and the time limit (how a long run survives its 24 h slots):
#   - tools/train.py saves and exits 0 when a worker gets SIGUSR1 or SIGTERM: it sets a flag, finishes the
#     running iteration, agrees across ranks (one signalled rank is enough), writes a full checkpoint
#     (model, optimizer state, scheduler, iteration, consumed samples, per-rank RNG) and exits.  Checkpoints are
#     written under a temporary name and renamed, so a save cut short leaves the previous one intact.
#   - --signal=B:USR1@600: SLURM sends SIGUSR1 to this batch shell 10 minutes (give or take SLURM's 60 s
#     resolution) before the time limit.  The shell forwards it to srun, srun to every task, i.e. straight to
#     every Python worker (there is no torchrun in between to die of SIGUSR1 or to SIGKILL workers after
#     its 30 s shutdown timeout).  When the step has exited 0 the shell runs `scontrol requeue $SLURM_JOB_ID`
#     (--requeue; REQUEUE=0 to skip), the job goes back to the queue with the same id, and the next start
#     resumes from $SAVE_DIR.  --open-mode=append keeps the log of every start in one %x-%j.log.
#     Give more lead time where one step plus a save takes longer: sbatch --signal=B:USR1@900 ...
#     Checkpoint-and-requeue by hand: scancel --batch --signal=USR1 <jobid>.
#   - SIGTERM (scancel, pre-emption by a higher-priority job, the time limit itself) reaches the workers
#     too and they try to save, but SLURM sends SIGKILL KillWait seconds later (30 s by default; GraceTime
#     for pre-emption), usually too soon for a 7B checkpoint with optimizer state: the USR1 lead time is what
#     makes the save reliable.  The shell does not requeue after SIGTERM (a pre-empting SLURM with
#     PreemptMode=REQUEUE requeues the job itself, since it is --requeue).
#   - Without SLURM: torchrun runs with --signals-to-handle ...,SIGUSR1 and --shutdown-timeout
#     $SHUTDOWN_TIMEOUT, so `kill -USR1 <torchrun pid>` (or -TERM) makes the workers save and exit; torchrun
#     itself then exits 1 with a SignalException traceback, which is expected.
#
# Before the first run:
#   python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B-Instruct --out "$PRETRAINED" --dtype bf16
#   python tools/preprocess_data.py --input train.jsonl --tokenizer Qwen2.5-7B-Instruct \
#       --out "$DATA_PATH" --pack-length "$SEQ_LENGTH" --workers 16
#   (the packs must be exactly SEQ_LENGTH long: one preprocessed data set per SCALE)
#
# Environment variables (default in brackets):
#   SCALE            4k | 32k | 128k: sequence length and parallel layout [4k]
#   PRETRAINED       converted Megatron checkpoint folder [$REPO_DIR/checkpoints/qwen2.5-7b-megatron]
#   DATA_PATH        preprocessed data prefix [$REPO_DIR/data/focusft-$SEQ_LENGTH]
#   SAVE_DIR         checkpoints of this run, also where it resumes from [$REPO_DIR/runs/focusft-qwen7b-$SCALE]
#   TP, CP           tensor / context parallel sizes [per SCALE, below]
#   SP               1: sequence parallel (needs TP > 1) [per SCALE]
#   RECOMPUTE        none | selective | full activation recomputation [per SCALE]
#   SEQ_LENGTH       tokens per packed sequence [per SCALE: 4096, 32768, 131072]
#   MICRO_BATCH      packed sequences per GPU per micro step [1]
#   GLOBAL_BATCH     packed sequences per optimizer step [32]
#   NNODES           nodes [$SLURM_NNODES, else 1]
#   GPUS_PER_NODE    GPUs (= processes) per node [8]
#   MASTER_ADDR      rendezvous host [first host of $SLURM_JOB_NODELIST via scontrol, else this host]
#   MASTER_PORT      rendezvous port [29500]
#   LR, MIN_LR, EPOCHS, SEED   [1e-5, 0, 5, 1234]; TRAIN_ITERS=N trains N steps instead of EPOCHS epochs
#   BILEVEL          1: FocuSFT bilevel step; 0: plain SFT baseline (--no-bilevel) [1]
#   ATTENTION_BACKEND  flex | dense | te (te has no glm mask) [flex]
#   SAVE_INTERVAL, LOG_INTERVAL, EVAL_INTERVAL   [200, 1, unset = not passed]
#   VALID_DATA_PATH  PREFIX of a validation set: its loss (base weights, no inner loop) at each EVAL_INTERVAL
#                    and at the end [unset = no validation; EVAL_INTERVAL needs it]
#   TENSORBOARD_DIR  [$SAVE_DIR/tensorboard];  WANDB_PROJECT  [unset = no wandb]
#   EXPORT_HF        write a Hugging Face folder here at the end [unset = no export]
#   EXTRA_ARGS       more tools/train.py arguments, appended last (word-split) [empty]
#   REQUEUE          1: requeue the job after a SIGUSR1-triggered save (SLURM only) [1]
#   CPUS_PER_TASK    CPU cores per task (= per GPU) under SLURM [$SLURM_CPUS_ON_NODE / GPUS_PER_NODE, at least 1]
#   SHUTDOWN_TIMEOUT seconds torchrun (no-SLURM path) lets workers save after a signal before SIGKILL [900]
#   TORCHRUN_SIGNAL_FLAGS  1: pass those two torchrun options; 0 for an older torchrun without them [1]
#   PYTHON           interpreter of the SLURM tasks [python]
#   DRY_RUN          1: print the environment and the exact launch command instead of running it [0]
set -euo pipefail

die() {
    echo "run_focusft_qwen7b.sh: error: $*" >&2
    exit 2
}

# --------------------------------------------------------------------------------------------- where
if [[ -n "${REPO_DIR:-}" ]]; then
    :
elif [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
    REPO_DIR=$SLURM_SUBMIT_DIR
else
    REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
DRY_RUN=${DRY_RUN:-0}

# --------------------------------------------------------------------------------------------- scale
# Parallel layout for Qwen2.5-7B on 80 GB GPUs, per context length. Memory plan (tools/memory_plan.py,
# predicted GiB per GPU for FocuSFT, bf16, distributed optimizer; details in BENCHMARKS.md):
#   4k:   TP=2, SP, no recompute          52.5 GiB   (1 node)
#   32k:  TP=4, CP=2, SP, selective       51.2 GiB   (2 nodes)
#   128k: TP=4, CP=8, SP, selective       49.9 GiB   (4 nodes; TP=8 cannot split the 4 KV heads of 7B)
SCALE=${SCALE:-4k}
case "${SCALE,,}" in
    4k)  # the paper's setting
        def_seq=4096;   def_tp=2; def_cp=1; def_sp=1; def_recompute=none ;;
    32k)
        def_seq=32768;  def_tp=4; def_cp=2; def_sp=1; def_recompute=selective ;;
    128k)
        def_seq=131072; def_tp=4; def_cp=8; def_sp=1; def_recompute=selective ;;
    *)
        die "unknown SCALE='$SCALE' (expected 4k, 32k or 128k)" ;;
esac
SCALE=${SCALE,,}
SEQ_LENGTH=${SEQ_LENGTH:-$def_seq}
TP=${TP:-$def_tp}
CP=${CP:-$def_cp}
SP=${SP:-$def_sp}
RECOMPUTE=${RECOMPUTE:-$def_recompute}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}

# --------------------------------------------------------------------------------------------- paths
PRETRAINED=${PRETRAINED:-$REPO_DIR/checkpoints/qwen2.5-7b-megatron}
DATA_PATH=${DATA_PATH:-$REPO_DIR/data/focusft-$SEQ_LENGTH}
SAVE_DIR=${SAVE_DIR:-$REPO_DIR/runs/focusft-qwen7b-$SCALE}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$SAVE_DIR/tensorboard}

# --------------------------------------------------------------------------------------------- recipe
LR=${LR:-1e-5}
MIN_LR=${MIN_LR:-0}
EPOCHS=${EPOCHS:-5}
TRAIN_ITERS=${TRAIN_ITERS:-}
SEED=${SEED:-1234}
BILEVEL=${BILEVEL:-1}
ATTENTION_BACKEND=${ATTENTION_BACKEND:-flex}
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
LOG_INTERVAL=${LOG_INTERVAL:-1}
EVAL_INTERVAL=${EVAL_INTERVAL:-}
VALID_DATA_PATH=${VALID_DATA_PATH:-}
WANDB_PROJECT=${WANDB_PROJECT:-}
EXPORT_HF=${EXPORT_HF:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
REQUEUE=${REQUEUE:-1}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}
TORCHRUN_SIGNAL_FLAGS=${TORCHRUN_SIGNAL_FLAGS:-1}
PYTHON=${PYTHON:-python}

# --------------------------------------------------------------------------------------------- checks
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
for v in SEQ_LENGTH TP CP MICRO_BATCH GLOBAL_BATCH NNODES GPUS_PER_NODE MASTER_PORT SHUTDOWN_TIMEOUT; do
    is_int "${!v}" || die "$v='${!v}' must be a positive integer"
done
[[ "$SP" == 0 || "$SP" == 1 ]] || die "SP='$SP' must be 0 or 1"
[[ "$BILEVEL" == 0 || "$BILEVEL" == 1 ]] || die "BILEVEL='$BILEVEL' must be 0 or 1"
[[ "$REQUEUE" == 0 || "$REQUEUE" == 1 ]] || die "REQUEUE='$REQUEUE' must be 0 or 1"
[[ "$TORCHRUN_SIGNAL_FLAGS" == 0 || "$TORCHRUN_SIGNAL_FLAGS" == 1 ]] ||
    die "TORCHRUN_SIGNAL_FLAGS='$TORCHRUN_SIGNAL_FLAGS' must be 0 or 1"
case "$RECOMPUTE" in none | selective | full) ;; *) die "RECOMPUTE='$RECOMPUTE' must be none, selective or full" ;; esac
case "$ATTENTION_BACKEND" in flex | dense | te) ;; *) die "ATTENTION_BACKEND='$ATTENTION_BACKEND' must be flex, dense or te" ;; esac
if [[ "$SP" == 1 && "$TP" == 1 ]]; then
    SP=0 # sequence parallelism splits along the tensor-parallel group: nothing to split at TP=1
fi
WORLD=$((NNODES * GPUS_PER_NODE))
((WORLD % (TP * CP) == 0)) ||
    die "$NNODES node(s) x $GPUS_PER_NODE GPUs = $WORLD GPUs is not a multiple of TP*CP = $TP*$CP = $((TP * CP)) (SCALE=$SCALE): use more nodes"
DP=$((WORLD / (TP * CP)))
((GLOBAL_BATCH % (MICRO_BATCH * DP) == 0)) ||
    die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of MICRO_BATCH*DP = $MICRO_BATCH*$DP"

# --------------------------------------------------------------------------------------------- environment
export CUDA_DEVICE_MAX_CONNECTIONS=1 # Megatron: TP/SP communication overlaps compute in issue order
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_ASYNC_ERROR_HANDLING=1 # older PyTorch name of the next one
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
EXPORTED=(CUDA_DEVICE_MAX_CONNECTIONS NCCL_IB_TIMEOUT NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_ASYNC_ERROR_HANDLING
    NCCL_DEBUG OMP_NUM_THREADS PYTORCH_CUDA_ALLOC_CONF PYTHONPATH)

# --------------------------------------------------------------------------------------------- train.py arguments
TRAIN_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"
    --data-path "$DATA_PATH"
    --load "$SAVE_DIR"
    --save "$SAVE_DIR"
    --tensor-model-parallel-size "$TP"
    --context-parallel-size "$CP"
    --seq-length "$SEQ_LENGTH"
    --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH"
    --optimizer adam
    --lr "$LR"
    --min-lr "$MIN_LR"
    --lr-decay-style cosine
    --lr-warmup-fraction 0.1
    --weight-decay 0.01
    --clip-grad 1.0
    --bf16
    --seed "$SEED"
    --attention-mask glm
    --attention-backend "$ATTENTION_BACKEND"
    --focusft-inner-steps 2
    --focusft-inner-lr 1.0
    --focusft-lora-rank 32
    --focusft-lora-alpha 64
    --focusft-layer-fraction 0.35
    --loss-reduction sample
    --device cuda
    --save-interval "$SAVE_INTERVAL"
    --log-interval "$LOG_INTERVAL"
    --tensorboard-dir "$TENSORBOARD_DIR"
)
if [[ -n "$TRAIN_ITERS" ]]; then TRAIN_ARGS+=(--train-iters "$TRAIN_ITERS"); else TRAIN_ARGS+=(--epochs "$EPOCHS"); fi
if [[ "$BILEVEL" == 1 ]]; then TRAIN_ARGS+=(--bilevel); else TRAIN_ARGS+=(--no-bilevel); fi
if [[ "$SP" == 1 ]]; then TRAIN_ARGS+=(--sequence-parallel); fi
if [[ "$RECOMPUTE" != none ]]; then TRAIN_ARGS+=(--recompute-granularity "$RECOMPUTE"); fi
if [[ -n "$VALID_DATA_PATH" ]]; then TRAIN_ARGS+=(--valid-data-path "$VALID_DATA_PATH"); fi
if [[ -n "$EVAL_INTERVAL" ]]; then TRAIN_ARGS+=(--eval-interval "$EVAL_INTERVAL"); fi
if [[ -n "$WANDB_PROJECT" ]]; then TRAIN_ARGS+=(--wandb-project "$WANDB_PROJECT"); fi
if [[ -n "$EXPORT_HF" ]]; then TRAIN_ARGS+=(--export-hf "$EXPORT_HF"); fi
if [[ -n "$EXTRA_ARGS" ]]; then
    read -r -a extra <<<"$EXTRA_ARGS"
    TRAIN_ARGS+=("${extra[@]}")
fi

# --------------------------------------------------------------------------------------------- launcher
# Under SLURM every task is one worker; this wrapper turns SLURM's per-task variables into the torchrun-style
# environment megatron_focusft/runtime.py reads (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR/MASTER_PORT are
# exported below) and execs the worker, so the worker is the task's process and gets SLURM's signals.
# shellcheck disable=SC2016  # expanded by each task's bash, not here
TASK_ENV='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
            MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        elif ((NNODES == 1)); then
            MASTER_ADDR=$(hostname)
        else
            die "cannot find the rendezvous host: scontrol or SLURM_JOB_NODELIST missing; set MASTER_ADDR"
        fi
    fi
    [[ -n "$MASTER_ADDR" ]] || die "empty MASTER_ADDR (scontrol show hostnames printed nothing)"
    if [[ -z "${CPUS_PER_TASK:-}" ]]; then
        CPUS_PER_TASK=$((${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE} / GPUS_PER_NODE))
        ((CPUS_PER_TASK >= 1)) || CPUS_PER_TASK=1
    fi
    is_int "$CPUS_PER_TASK" || die "CPUS_PER_TASK='$CPUS_PER_TASK' must be a positive integer"
    export MASTER_ADDR MASTER_PORT
    EXPORTED+=(MASTER_ADDR MASTER_PORT)
    # --ntasks is explicit: sbatch exports SLURM_NTASKS, which srun would otherwise take as its task count.
    LAUNCH=(
        srun --nodes "$NNODES" --ntasks "$WORLD" --ntasks-per-node "$GPUS_PER_NODE"
        --cpus-per-task "$CPUS_PER_TASK" --kill-on-bad-exit=1
        bash -c "$TASK_ENV" focusft-task "$PYTHON" -u
    )
else
    ((NNODES == 1)) || die "NNODES=$NNODES without SLURM: multi-node runs need sbatch (or set SLURM_* yourself)"
    LAUNCH=(torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS_PER_NODE")
    if [[ "$TORCHRUN_SIGNAL_FLAGS" == 1 ]]; then
        # torchrun forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT by default (SIGUSR1 would kill it) and
        # SIGKILLs its workers 30 s after forwarding: give them the time to finish a step and save.
        LAUNCH+=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT")
    fi
fi
CMD=("${LAUNCH[@]}" "$REPO_DIR/tools/train.py" "${TRAIN_ARGS[@]}")

echo "# FocuSFT Qwen2.5-7B: SCALE=$SCALE seq=$SEQ_LENGTH nodes=$NNODES gpus/node=$GPUS_PER_NODE" \
    "TP=$TP CP=$CP SP=$SP DP=$DP recompute=$RECOMPUTE micro=$MICRO_BATCH global=$GLOBAL_BATCH" \
    "accumulation=$((GLOBAL_BATCH / (MICRO_BATCH * DP)))"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    echo "# pre-emption: SIGUSR1 to this shell (sbatch --signal=B:USR1@600) is forwarded to srun and its tasks;" \
        "the workers save and exit; then requeue=$REQUEUE (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0})"
fi
if [[ "$DRY_RUN" == 1 ]]; then
    for v in "${EXPORTED[@]}"; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'cd %q\n' "$REPO_DIR"
    printf '%q' "${CMD[0]}"
    printf ' %q' "${CMD[@]:1}"
    printf '\n'
    exit 0
fi

cd "$REPO_DIR"
[[ -f tools/train.py ]] || die "$REPO_DIR/tools/train.py not found; submit from the repository root or set REPO_DIR"
[[ -e "$PRETRAINED" ]] || die "PRETRAINED=$PRETRAINED does not exist (convert with tools/convert_hf_to_megatron.py)"
[[ -e "$DATA_PATH.idx" || -e "$DATA_PATH.json" ]] ||
    die "DATA_PATH=$DATA_PATH: no preprocessed data (make it with tools/preprocess_data.py --pack-length $SEQ_LENGTH)"
mkdir -p "$SAVE_DIR"
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    exec "${CMD[@]}"
fi

# SLURM: run the step in the background so that this shell can take SIGUSR1/SIGTERM while it runs (bash runs
# a trap only between commands, and a foreground srun would hold it off until the step is over).
STOP_SIGNAL=
STEP_PID=
forward() {
    STOP_SIGNAL=$1
    echo "run_focusft_qwen7b.sh: got SIG$1, forwarding it to the training step (the workers save and exit)" >&2
    if [[ -n "$STEP_PID" ]]; then kill -s "$1" "$STEP_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${CMD[@]}" &
STEP_PID=$!
while :; do
    rc=0
    wait "$STEP_PID" || rc=$?
    # > 128: wait was interrupted by a trapped signal; the step is still running (or just ended)
    if ((rc > 128)) && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    break
done
if ((rc > 128)); then # it ended right after the interruption: its own status is still there to collect
    rc=0
    wait "$STEP_PID" || rc=$?
fi
trap - USR1 TERM
echo "run_focusft_qwen7b.sh: training step exited with status $rc${STOP_SIGNAL:+ after SIG$STOP_SIGNAL}" >&2
if [[ "$STOP_SIGNAL" == USR1 && "$rc" == 0 && "$REQUEUE" == 1 ]]; then
    echo "run_focusft_qwen7b.sh: requeueing job $SLURM_JOB_ID; it resumes from $SAVE_DIR" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "run_focusft_qwen7b.sh: scontrol requeue failed; resubmit by hand" >&2
fi
exit "$rc"
