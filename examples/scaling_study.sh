#!/usr/bin/env bash
# The scaling study: standard SFT and FocuSFT on every Qwen2.5 size with the same data and budget, one SLURM
# job per (model, method), each through examples/run_focusft_qwen7b.sh; then tools/evaluate.py and
# tools/collect_runs.py turn the run folders into a table and a figure (score and FocuSFT's step-time
# overhead against model size).
#
#   DATA_PATH=data/focusft-4096 CKPT_DIR=checkpoints bash examples/scaling_study.sh    # submit the 14 jobs
#   DRY_RUN=1 bash examples/scaling_study.sh                                           # print them only
#   MODELS="qwen2.5-0.5b qwen2.5-7b" NODES="qwen2.5-7b=2" bash examples/scaling_study.sh
#
# Every job gets the same DATA_PATH, TRAIN_ITERS, GLOBAL_BATCH and SEED (and whatever else of the run
# script's environment is set here: SCALE, LR, ...).  What differs is the model (MODEL=<preset>,
# PRETRAINED=$CKPT_DIR/<preset>), the method (sft: BILEVEL=0, i.e. --no-bilevel; focusft: BILEVEL=1) and
# the node count; the parallel layout on those nodes is the run script's choice for MODEL.  A job's folder,
# $STUDY_DIR/<model>-<method>, is its SAVE_DIR (checkpoints, TensorBoard events) and holds its SLURM log;
# resubmitting a job resumes it from there.
#
# Environment variables (default in brackets):
#   MODELS       presets to train [qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b]
#   METHODS      sft and/or focusft [sft focusft]
#   DATA_PATH    preprocessed data prefix, the same for every job [$REPO_DIR/data/focusft-4096]
#   CKPT_DIR     converted checkpoints (tools/convert_hf_to_megatron.py), one folder per preset [$REPO_DIR/checkpoints]
#   STUDY_DIR    where the run folders go [$REPO_DIR/runs/scaling-study]
#   TRAIN_ITERS  optimizer steps of every job [500]
#   GLOBAL_BATCH packed sequences per step [32]
#   SEED         [1234]
#   NODES        node counts replacing the table below, as model=count words, e.g. "qwen2.5-72b=16" []
#   SBATCH_ARGS  more sbatch options for every job (word-split), e.g. "--partition=gpu --account=x" []
#   PYTHON       interpreter for the printed follow-up commands [python3]
#   DRY_RUN      1: print every sbatch command instead of submitting it [0]
set -euo pipefail

die() {
    echo "scaling_study.sh: error: $*" >&2
    exit 2
}

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
RUN_SCRIPT=$REPO_DIR/examples/run_focusft_qwen7b.sh
DRY_RUN=${DRY_RUN:-0}

# Nodes per model (8 GPUs of 80 GB each), from tools/memory_plan.py at 4K tokens (FocuSFT, bf16, sequence
# parallel, distributed optimizer over the nodes' data-parallel ranks):
#   0.5B-7B: 1 node (7B at TP=2: 52.5 GiB)   14B: 2 nodes (TP=4: 48 GiB)   32B: 4 nodes (TP=8: 53 GiB)
#   72B: 8 nodes (the run script's planner: TP=8, CP=4, DP=2; TP=8 with CP=1 needs 91 GiB per GPU even over 64
#   GPUs; on 4 nodes it takes PP=2: NODES="qwen2.5-72b=4")
declare -A NODES_OF=(
    [qwen2.5-0.5b]=1 [qwen2.5-1.5b]=1 [qwen2.5-3b]=1 [qwen2.5-7b]=1
    [qwen2.5-14b]=2 [qwen2.5-32b]=4 [qwen2.5-72b]=8
)
KNOWN="qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b"

MODELS=${MODELS:-$KNOWN}
METHODS=${METHODS:-sft focusft}
DATA_PATH=${DATA_PATH:-$REPO_DIR/data/focusft-4096}
CKPT_DIR=${CKPT_DIR:-$REPO_DIR/checkpoints}
STUDY_DIR=${STUDY_DIR:-$REPO_DIR/runs/scaling-study}
TRAIN_ITERS=${TRAIN_ITERS:-500}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
SEED=${SEED:-1234}
NODES=${NODES:-}
SBATCH_ARGS=${SBATCH_ARGS:-}
PYTHON=${PYTHON:-python3}

# --------------------------------------------------------------------------------------------- checks
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
for v in TRAIN_ITERS GLOBAL_BATCH; do
    is_int "${!v}" || die "$v='${!v}' must be a positive integer"
done
[[ "$SEED" =~ ^[0-9]+$ ]] || die "SEED='$SEED' must be a non-negative integer"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN='$DRY_RUN' must be 0 or 1"
read -r -a models <<<"$MODELS"
read -r -a methods <<<"$METHODS"
((${#models[@]} > 0)) || die "MODELS is empty"
((${#methods[@]} > 0)) || die "METHODS is empty"
for m in "${models[@]}"; do
    [[ -n "${NODES_OF[$m]:-}" ]] || die "unknown model '$m' in MODELS (known: $KNOWN)"
done
for method in "${methods[@]}"; do
    [[ "$method" == sft || "$method" == focusft ]] || die "unknown method '$method' in METHODS (sft, focusft)"
done
read -r -a overrides <<<"$NODES"
for word in ${overrides[@]+"${overrides[@]}"}; do
    m=${word%%=*}
    n=${word#*=}
    [[ "$word" == *=* && -n "${NODES_OF[$m]:-}" ]] || die "NODES: '$word' is not <known model>=<nodes> (known: $KNOWN)"
    is_int "$n" || die "NODES: '$word': the node count must be a positive integer"
    NODES_OF[$m]=$n
done
read -r -a sbatch_args <<<"$SBATCH_ARGS"
[[ -f "$RUN_SCRIPT" ]] || die "$RUN_SCRIPT not found (set REPO_DIR)"
if [[ "$DRY_RUN" == 0 ]]; then # everything every job needs, before the first one is submitted
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found: submit from a SLURM login node (or DRY_RUN=1)"
    [[ -e "$DATA_PATH.idx" ]] || die "DATA_PATH=$DATA_PATH: no preprocessed data ($DATA_PATH.idx)"
    for m in "${models[@]}"; do
        [[ -d "$CKPT_DIR/$m" ]] || die "$CKPT_DIR/$m does not exist: convert $m there first (CKPT_DIR)"
    done
fi

# --------------------------------------------------------------------------------------------- submit
runs=()
echo "# scaling study: ${#models[@]} model(s) x ${#methods[@]} method(s); TRAIN_ITERS=$TRAIN_ITERS" \
    "GLOBAL_BATCH=$GLOBAL_BATCH SEED=$SEED DATA_PATH=$DATA_PATH"
for m in "${models[@]}"; do
    for method in "${methods[@]}"; do
        run=$STUDY_DIR/$m-$method
        runs+=("$run")
        if [[ "$method" == sft ]]; then bilevel=0; else bilevel=1; fi # sft: --no-bilevel
        cmd=(
            env REPO_DIR="$REPO_DIR" MODEL="$m" BILEVEL="$bilevel" PRETRAINED="$CKPT_DIR/$m" DATA_PATH="$DATA_PATH"
            TRAIN_ITERS="$TRAIN_ITERS" GLOBAL_BATCH="$GLOBAL_BATCH" SEED="$SEED" SAVE_DIR="$run"
            NNODES="${NODES_OF[$m]}"
            sbatch --parsable --export=ALL --nodes="${NODES_OF[$m]}" --job-name="study-$m-$method"
            --output="$run/slurm-%j.log" ${sbatch_args[@]+"${sbatch_args[@]}"} "$RUN_SCRIPT"
        )
        if [[ "$DRY_RUN" == 1 ]]; then
            printf '%q' "${cmd[0]}"
            printf ' %q' "${cmd[@]:1}"
            printf '\n'
        else
            mkdir -p "$run" # sbatch writes the log there: the folder must exist
            job=$("${cmd[@]}") || die "sbatch failed for $m-$method (jobs already submitted keep running)"
            echo "$m-$method: job ${job%%;*}, ${NODES_OF[$m]} node(s), $run"
        fi
    done
done

# --------------------------------------------------------------------------------------------- afterwards
q_runs=$(printf ' %q' "${runs[@]}")
echo "# when the jobs have finished: evaluate every run with the same tasks and lengths into RUN/eval.json, e.g."
echo "#   $PYTHON $REPO_DIR/tools/evaluate.py --ckpt RUN --device cuda --tasks all --lengths 4k,8k,16k,32k" \
    "--json RUN/eval.json"
echo "# then the table (stdout, CSV, JSON) and the figure:"
echo "$PYTHON $(printf %q "$REPO_DIR/tools/collect_runs.py")$q_runs --csv $(printf %q "$STUDY_DIR/runs.csv")" \
    "--json $(printf %q "$STUDY_DIR/runs.json") --plot $(printf %q "$STUDY_DIR/scaling.png")"
