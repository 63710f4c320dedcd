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
# FocuSFT (bilevel long-context SFT) of a Qwen2.5 model (MODEL, Qwen2.5-7B by default) with Megatron-Core: under
# SLURM one srun task per GPU (8 per node, no torchrun: RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/
# SLURM_NTASKS/SLURM_LOCALID); without SLURM one torchrun --standalone here.
#
#   sbatch examples/run_focusft_qwen7b.sh                          # the paper's 4K recipe on 1 node
#   SCALE=32k sbatch --nodes=2 examples/run_focusft_qwen7b.sh      # 32K context (TP=4, CP=2, SP, selective)
#   SCALE=128k sbatch --nodes=4 examples/run_focusft_qwen7b.sh     # 128K context (TP=4, CP=8, SP, selective)
#   MODEL=qwen2.5-72b sbatch --nodes=4 examples/run_focusft_qwen7b.sh  # 72B, 4K on 32 GPUs: the planner's layout
#                                                                  # (TP=8, SP, PP=2 with 50 + 30 layers, CP=2)
#   MODEL=qwen2.5-72b sbatch --nodes=8 examples/run_focusft_qwen7b.sh  # 72B, 4K on 64 GPUs (TP=8, SP, CP=4, DP=2)
#   MODEL=qwen2.5-72b TP=8 PP=2 CP=2 RECOMPUTE=none FIRST_STAGE_LAYERS=47 sbatch --nodes=4 ...  # your layout
#   DRY_RUN=1 bash examples/run_focusft_qwen7b.sh                  # print the layout and the commands, run nothing
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
#   MODEL            qwen2.5-{0.5b,1.5b,3b,7b,14b,32b,72b}: the model [qwen2.5-7b]
#   SCALE            4k | 32k | 128k: sequence length (and, for qwen2.5-7b, the preset layout) [4k]
#   LAYOUT           preset: qwen2.5-7b's tested layout per SCALE (below); auto: ask the planner,
#                    tools/memory_plan.py --shell, for the fastest layout of NNODES x GPUS_PER_NODE GPUs that
#                    fits GPU_MEMORY_GIB at SEQ_LENGTH, planned for FocuSFT even when BILEVEL=0 (so SFT and
#                    FocuSFT of one model share a layout) [preset for qwen2.5-7b, auto for the others]
#   GPU_MEMORY_GIB   memory per GPU the planner fills [80]
#   PRETRAINED       converted Megatron checkpoint folder [$REPO_DIR/checkpoints/$MODEL-megatron]
#   DATA_PATH        preprocessed data prefix [$REPO_DIR/data/focusft-$SEQ_LENGTH]
#   SAVE_DIR         checkpoints of this run, also where it resumes from
#                    [$REPO_DIR/runs/focusft-qwen<size>-$SCALE, e.g. runs/focusft-qwen7b-4k]
#   The layout: each of the next variables you set wins over the preset's or the planner's value (the
#   planner is not asked when TP, PP, CP and RECOMPUTE are all set); the log says where each one came from.
#   TP, PP, CP       tensor / pipeline / context parallel sizes [preset: per SCALE, PP=1; auto: the planner's]
#   FIRST_STAGE_LAYERS, LAST_STAGE_LAYERS   decoder layers on the first / last pipeline stage (PP > 1;
#                    --decoder-first/last-pipeline-num-layers), empty: Megatron's even split; set, even to
#                    empty, they win [the planner's split when PP is the planner's PP, else empty]
#   SP               1: sequence parallel (needs TP > 1) [preset: per SCALE; auto: the planner's; else 1]
#   RECOMPUTE        none | selective | full activation recomputation [preset: per SCALE; auto: the planner's]
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
#   PYTHON           interpreter of the SLURM tasks and of the planner [python]
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

# --------------------------------------------------------------------------------------------- model, scale
KNOWN_MODELS=(qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b)
MODEL=${MODEL:-qwen2.5-7b}
MODEL=${MODEL,,}
known=0
for m in "${KNOWN_MODELS[@]}"; do
    if [[ "$m" == "$MODEL" ]]; then known=1; fi
done
((known)) || die "unknown MODEL='$MODEL' (presets: ${KNOWN_MODELS[*]})"
MODEL_NAME="Qwen${MODEL#qwen}" # qwen2.5-72b -> Qwen2.5-72B
MODEL_NAME=${MODEL_NAME%b}B
MODEL_TAG="qwen${MODEL#qwen2.5-}" # qwen2.5-7b -> qwen7b (run folder names)

# The tested layout of Qwen2.5-7B on 80 GB GPUs, per context length (LAYOUT=preset). Memory plan
# (tools/memory_plan.py, predicted GiB per GPU for FocuSFT, bf16, distributed optimizer; details in BENCHMARKS.md):
#   4k:   TP=2, SP, no recompute          52.5 GiB   (1 node)
#   32k:  TP=4, CP=2, SP, selective       51.2 GiB   (2 nodes)
#   128k: TP=4, CP=8, SP, selective       49.9 GiB   (4 nodes; TP=8 cannot split the 4 KV heads of 7B)
# Other models (and LAYOUT=auto) take the planner's layout, in "layout" below.
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
if [[ "$MODEL" == qwen2.5-7b ]]; then def_layout=preset; else def_layout=auto; fi
LAYOUT=${LAYOUT:-$def_layout}
case "$LAYOUT" in preset | auto) ;; *) die "LAYOUT='$LAYOUT' must be preset or auto" ;; esac
[[ "$LAYOUT" == auto || "$MODEL" == qwen2.5-7b ]] ||
    die "LAYOUT=preset: only MODEL=qwen2.5-7b has preset layouts (MODEL=$MODEL: use LAYOUT=auto or set TP, PP, CP, RECOMPUTE)"
# Who set each layout variable: the user (set in the environment; the split variables even when empty), else
# the preset, the planner or a default (filled in below).
declare -A FROM=()
for v in TP PP CP SP RECOMPUTE; do
    if [[ -n "${!v:-}" ]]; then FROM[$v]=user; fi
done
for v in FIRST_STAGE_LAYERS LAST_STAGE_LAYERS; do
    if [[ -n "${!v+set}" ]]; then FROM[$v]=user; fi
done
SEQ_LENGTH=${SEQ_LENGTH:-$def_seq}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}

# --------------------------------------------------------------------------------------------- paths
PRETRAINED=${PRETRAINED:-$REPO_DIR/checkpoints/$MODEL-megatron}
DATA_PATH=${DATA_PATH:-$REPO_DIR/data/focusft-$SEQ_LENGTH}
SAVE_DIR=${SAVE_DIR:-$REPO_DIR/runs/focusft-$MODEL_TAG-$SCALE}
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

# FocuSFT's knobs (the paper's): given to tools/train.py and to the planner
INNER_STEPS=2
INNER_LR=1.0
LORA_RANK=32
LORA_ALPHA=64
LAYER_FRACTION=0.35

# --------------------------------------------------------------------------------------------- checks
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
for v in SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH NNODES GPUS_PER_NODE MASTER_PORT SHUTDOWN_TIMEOUT; do
    is_int "${!v}" || die "$v='${!v}' must be a positive integer"
done
[[ "$GPU_MEMORY_GIB" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "GPU_MEMORY_GIB='$GPU_MEMORY_GIB' must be a number of GiB"
[[ "$BILEVEL" == 0 || "$BILEVEL" == 1 ]] || die "BILEVEL='$BILEVEL' must be 0 or 1"
[[ "$REQUEUE" == 0 || "$REQUEUE" == 1 ]] || die "REQUEUE='$REQUEUE' must be 0 or 1"
[[ "$TORCHRUN_SIGNAL_FLAGS" == 0 || "$TORCHRUN_SIGNAL_FLAGS" == 1 ]] ||
    die "TORCHRUN_SIGNAL_FLAGS='$TORCHRUN_SIGNAL_FLAGS' must be 0 or 1"
case "$ATTENTION_BACKEND" in flex | dense | te) ;; *) die "ATTENTION_BACKEND='$ATTENTION_BACKEND' must be flex, dense or te" ;; esac
WORLD=$((NNODES * GPUS_PER_NODE))

# --------------------------------------------------------------------------------------------- layout
# choose VAR VALUE SOURCE: VAR=VALUE, from SOURCE, unless the user set VAR
choose() {
    if [[ -z "${FROM[$1]:-}" ]]; then
        printf -v "$1" '%s' "$2"
        FROM[$1]=$3
    fi
}
check_layout_value() { # VAR: dies unless VAR's value is one it can take
    case "$1" in
        TP | PP | CP) is_int "${!1}" || die "$1='${!1}' must be a positive integer" ;;
        SP) [[ "$SP" == 0 || "$SP" == 1 ]] || die "SP='$SP' must be 0 or 1" ;;
        RECOMPUTE) [[ "$RECOMPUTE" =~ ^(none|selective|full)$ ]] || die "RECOMPUTE='$RECOMPUTE' must be none, selective or full" ;;
        *) [[ -z "${!1}" ]] || is_int "${!1}" || die "$1='${!1}' must be empty (the even split) or a positive integer" ;;
    esac
}
for v in "${!FROM[@]}"; do # the user's, before asking the planner
    check_layout_value "$v"
done
PLAN_TEXT=
declare -A PLANNED=()
if [[ "$LAYOUT" == preset ]]; then
    choose TP "$def_tp" preset
    choose PP 1 preset
    choose CP "$def_cp" preset
    choose SP "$def_sp" preset
    choose RECOMPUTE "$def_recompute" preset
elif [[ -z "${FROM[TP]:-}" || -z "${FROM[PP]:-}" || -z "${FROM[CP]:-}" || -z "${FROM[RECOMPUTE]:-}" ]]; then
    # The planner: the fastest layout of WORLD GPUs that fits, for FocuSFT whatever BILEVEL says (the SFT baseline
    # then runs on the same layout); te is planned as flex (neither materialises the mask).
    plan_backend=flex
    if [[ "$ATTENTION_BACKEND" == dense ]]; then plan_backend=dense; fi
    PLAN_CMD=(
        "$PYTHON" "$REPO_DIR/tools/memory_plan.py" --shell --num-gpus "$WORLD" --preset "$MODEL"
        --seq-length "$SEQ_LENGTH" --global-batch-size "$GLOBAL_BATCH" --micro-batch-size "$MICRO_BATCH"
        --gpu-memory-gib "$GPU_MEMORY_GIB" --attention-backend "$plan_backend" --bilevel
        --focusft-inner-steps "$INNER_STEPS" --focusft-layer-fraction "$LAYER_FRACTION" --focusft-lora-rank "$LORA_RANK"
    )
    PLAN_TEXT=$(printf '%q ' "${PLAN_CMD[@]}")
    PLAN_TEXT=${PLAN_TEXT% }
    [[ -f "$REPO_DIR/tools/memory_plan.py" ]] || die "$REPO_DIR/tools/memory_plan.py not found (set REPO_DIR)"
    plan_err=$(mktemp)
    plan_rc=0
    plan_out=$(PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "${PLAN_CMD[@]}" 2>"$plan_err") || plan_rc=$?
    plan_msg=$(grep -v '^[[:space:]]*$' "$plan_err" | tail -n 1 || true)
    rm -f "$plan_err"
    if ((plan_rc == 1)); then
        die "MODEL=$MODEL on $WORLD GPUs at SEQ_LENGTH=$SEQ_LENGTH: ${plan_msg#error: }; use more nodes, or set TP, PP, CP and RECOMPUTE (planner: $PLAN_TEXT)"
    elif ((plan_rc != 0)); then
        die "the planner failed (exit $plan_rc: ${plan_msg:-no message}): $PLAN_TEXT"
    fi
    plan_line=$(grep -v '^[[:space:]]*$' <<<"$plan_out" | tail -n 1 || true)
    re='^TP=([0-9]+) PP=([0-9]+) CP=([0-9]+) DP=([0-9]+) SP=([01]) RECOMPUTE=(none|selective|full) FIRST_STAGE_LAYERS=([0-9]*) LAST_STAGE_LAYERS=([0-9]*)$'
    [[ "$plan_line" =~ $re ]] || die "unexpected planner output '$plan_line' from: $PLAN_TEXT"
    PLANNED=(
        [TP]=${BASH_REMATCH[1]} [PP]=${BASH_REMATCH[2]} [CP]=${BASH_REMATCH[3]} [SP]=${BASH_REMATCH[5]}
        [RECOMPUTE]=${BASH_REMATCH[6]} [FIRST_STAGE_LAYERS]=${BASH_REMATCH[7]} [LAST_STAGE_LAYERS]=${BASH_REMATCH[8]}
    )
    for v in TP PP CP SP RECOMPUTE; do
        choose "$v" "${PLANNED[$v]}" planner
    done
    if [[ "$PP" == "${PLANNED[PP]}" ]]; then # the planner's split is for its PP only
        choose FIRST_STAGE_LAYERS "${PLANNED[FIRST_STAGE_LAYERS]}" planner
        choose LAST_STAGE_LAYERS "${PLANNED[LAST_STAGE_LAYERS]}" planner
    fi
fi
choose SP 1 default
choose FIRST_STAGE_LAYERS "" default
choose LAST_STAGE_LAYERS "" default
# One line saying where each layout variable came from (no "NAME=value" in it: tools/collect_runs.py reads the
# header line below as the layout).
layout_from=
for source in preset planner user default; do
    names=
    for v in TP PP CP SP RECOMPUTE FIRST_STAGE_LAYERS LAST_STAGE_LAYERS; do
        if [[ "${FROM[$v]}" == "$source" ]]; then names+=" $v"; fi
    done
    [[ -n "$names" ]] || continue
    case "$source" in
        preset) what="the $MODEL SCALE $SCALE preset" ;;
        planner) what="the planner ($PLAN_TEXT)" ;;
        user) what="the user" ;;
        default) what="defaults" ;;
    esac
    layout_from+="; ${names# } from $what"
    if [[ "$source" == user && -n "$PLAN_TEXT" ]]; then
        said=
        for v in $names; do
            if [[ -n "${PLANNED[$v]+set}" ]]; then said+=", $v ${PLANNED[$v]:-even}"; fi
        done
        if [[ -n "$said" ]]; then layout_from+=" (the planner's: ${said#, })"; fi
    fi
done
layout_from=${layout_from#; }

for v in TP PP CP SP RECOMPUTE FIRST_STAGE_LAYERS LAST_STAGE_LAYERS; do
    check_layout_value "$v"
done
for v in FIRST_STAGE_LAYERS LAST_STAGE_LAYERS; do
    [[ -z "${!v}" ]] || ((PP > 1)) || die "$v=${!v} needs pipeline parallelism (PP=$PP): set PP > 1 or leave $v empty"
done
if [[ "$SP" == 1 && "$TP" == 1 ]]; then
    SP=0 # sequence parallelism splits along the tensor-parallel group: nothing to split at TP=1
fi
((WORLD % (TP * CP * PP) == 0)) ||
    die "$NNODES node(s) x $GPUS_PER_NODE GPUs = $WORLD GPUs is not a multiple of TP*CP*PP = $TP*$CP*$PP = $((TP * CP * PP)) (MODEL=$MODEL SCALE=$SCALE): use more nodes"
DP=$((WORLD / (TP * CP * PP)))
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
    --pipeline-model-parallel-size "$PP"
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
    --focusft-inner-steps "$INNER_STEPS"
    --focusft-inner-lr "$INNER_LR"
    --focusft-lora-rank "$LORA_RANK"
    --focusft-lora-alpha "$LORA_ALPHA"
    --focusft-layer-fraction "$LAYER_FRACTION"
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
if [[ -n "$FIRST_STAGE_LAYERS" ]]; then TRAIN_ARGS+=(--decoder-first-pipeline-num-layers "$FIRST_STAGE_LAYERS"); fi
if [[ -n "$LAST_STAGE_LAYERS" ]]; then TRAIN_ARGS+=(--decoder-last-pipeline-num-layers "$LAST_STAGE_LAYERS"); fi
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

if [[ "$BILEVEL" == 1 ]]; then method=FocuSFT; else method=SFT; fi
stages=
if ((PP > 1)); then stages=" first_stage_layers=${FIRST_STAGE_LAYERS:-even} last_stage_layers=${LAST_STAGE_LAYERS:-even}"; fi
echo "# $method $MODEL_NAME: SCALE=$SCALE seq=$SEQ_LENGTH nodes=$NNODES gpus/node=$GPUS_PER_NODE" \
    "TP=$TP PP=$PP CP=$CP SP=$SP DP=$DP$stages recompute=$RECOMPUTE micro=$MICRO_BATCH global=$GLOBAL_BATCH" \
    "accumulation=$((GLOBAL_BATCH / (MICRO_BATCH * DP)))"
echo "# layout of $MODEL on $WORLD GPUs: $layout_from"
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
