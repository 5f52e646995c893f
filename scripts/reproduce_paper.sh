#!/usr/bin/env bash
# Reproduce the CIFAR-10 study of Ghorbani, Krishnan & Xiao (2019): ResNet-32 with and without BatchNorm, trained
# with SGD, the whole Hessian spectrum of every checkpoint, and the figures: the eigenvalue densities of each run
# (log scale) and the evolution of the top eigenvalues and the gradient overlap, BN against no BN.
#
#   CIFAR10_ROOT=~/data/cifar10 scripts/reproduce_paper.sh [local|gpus|slurm]
#
# Stages (each resumes where it stopped, so rerun the same command after an interruption):
#   1. train  scripts/train_cifar.py for both networks -> $RUNS/{bn,nobn}/ckpt_<step>.pt (0, 100, 200, 400, ...)
#   2. analyze every checkpoint                         -> $RESULTS/{bn,nobn}.h5
#        local: one process per run on $DEVICE (the default: cuda if available)
#        gpus:  torchrun over the $NPROC GPUs of this machine (data parallel, one checkpoint at a time)
#        slurm: training as one GPU job per network, analysis as array jobs (scripts/slurm/analyze_array.sbatch)
#               of $ARRAY_TASKS tasks per network, then a merge; uses sbatch --wait, so run this script from a
#               login node inside tmux/screen. Extra sbatch options: SBATCH_ARGS="--partition=gpu --account=..."
#   3. plot   $RESULTS/density_bn.png, density_nobn.png, evolution.png and summary.txt (hessspec info)
# STAGES=train,analyze,plot selects stages.
#
# Cost with the defaults (the paper's: the whole training set, 90 Lanczos steps, 10 probes, 64k training steps):
# training ~1 h per network on one recent GPU; analysis of one checkpoint ~90 passes over 50k images with 11
# Hessian-vector products each (~10-30 min on one GPU), 12 checkpoints per network. SAMPLES=10000 cuts the
# analysis five-fold. Everything is scaled down by the variables below (the test runs it on CPU in a minute).
set -euo pipefail

MODE=${1:-${MODE:-local}}
: "${CIFAR10_ROOT:?set CIFAR10_ROOT to the directory holding cifar-10-batches-py/ (never downloaded)}"
RUNS=${RUNS:-runs/cifar10}
RESULTS=${RESULTS:-results/cifar10}
STAGES=${STAGES:-train,analyze,plot}
PYTHON=${PYTHON:-python}
HESSSPEC=${HESSSPEC:-hessspec}           # e.g. "python -m hessspec"
TORCHRUN=${TORCHRUN:-torchrun}
SCRIPTS=${SCRIPTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
# networks: the paper's ResNet-32; cifar-resnet20(-nobn) for a quicker look
MODEL_BN=${MODEL_BN:-cifar-resnet32}
MODEL_NOBN=${MODEL_NOBN:-cifar-resnet32-nobn}
# training (scripts/train_cifar.py --help; defaults of He et al. 2016 and, without BN, lr 0.01 with warm-up)
TRAIN_STEPS=${TRAIN_STEPS:-64000}
TRAIN_BATCH=${TRAIN_BATCH:-128}
FIRST_CKPT=${FIRST_CKPT:-100}           # checkpoints at 0, 100, 200, 400, ... and the last step
TRAIN_ARGS=${TRAIN_ARGS:-}              # more train_cifar.py options, e.g. "--nobn-lr 0.02"
# analysis (hessspec analyze --help)
SAMPLES=${SAMPLES:-}                     # default: the whole (un-augmented) training set
BATCH_SIZE=${BATCH_SIZE:-$TRAIN_BATCH}   # BN train mode: the training batch size
LANCZOS_STEPS=${LANCZOS_STEPS:-90}
PROBES=${PROBES:-10}
TOP_K=${TOP_K:-20}
DTYPE=${DTYPE:-float32}
DEVICE=${DEVICE:-auto}
ANALYZE_ARGS=${ANALYZE_ARGS:-}          # more hessspec analyze options
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}  # gpus mode
ARRAY_TASKS=${ARRAY_TASKS:-4}            # slurm mode: array tasks per network
SBATCH_ARGS=${SBATCH_ARGS:-}
LOGS=${LOGS:-logs}

case "$MODE" in local|gpus|slurm) ;; *) echo "unknown mode '$MODE'; expected local, gpus or slurm" >&2; exit 2;; esac
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "[reproduce_paper $(date +%H:%M:%S)] $*"; }
# Commands and extra options given as strings are split on whitespace (no quoting inside them).
read -r -a python <<< "$PYTHON"
read -r -a hessspec <<< "$HESSSPEC"
read -r -a torchrun <<< "$TORCHRUN"
read -r -a train_extra <<< "$TRAIN_ARGS"
read -r -a analyze_extra <<< "$ANALYZE_ARGS"
read -r -a sbatch_extra <<< "$SBATCH_ARGS"
mkdir -p "$RUNS" "$RESULTS"
model_of() { if [[ $1 == bn ]]; then echo "$MODEL_BN"; else echo "$MODEL_NOBN"; fi; }
pretty() { local depth=${1#cifar-resnet}; depth=${depth%-nobn}; [[ $1 == cifar-resnet* ]] && echo "ResNet-$depth" || echo "$1"; }
LABEL_BN=${LABEL_BN:-"$(pretty "$MODEL_BN"), BN"}        # names of the runs in the figures
LABEL_NOBN=${LABEL_NOBN:-"$(pretty "$MODEL_NOBN"), no BN"}
label_of() { if [[ $1 == bn ]]; then echo "$LABEL_BN"; else echo "$LABEL_NOBN"; fi; }

# ------------------------------------------------------------------------------------------------------ 1. train
if has_stage train; then
    pids=()
    for run in bn nobn; do
        cmd=("${python[@]}" "$SCRIPTS/train_cifar.py" --data "$CIFAR10_ROOT" --model "$(model_of $run)"
             --out "$RUNS/$run" --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --first-checkpoint "$FIRST_CKPT"
             ${train_extra[@]+"${train_extra[@]}"})
        [[ "$DEVICE" != auto ]] && cmd+=(--device "$DEVICE")
        if [[ "$MODE" == slurm ]]; then
            mkdir -p "$LOGS"
            say "training $(model_of $run) -> $RUNS/$run as a SLURM job (waiting for it)"
            sbatch --wait --job-name="train-$run" --gres=gpu:1 --cpus-per-task=8 --time=08:00:00 --requeue \
                --open-mode=append --output="$LOGS/%x-%j.out" ${sbatch_extra[@]+"${sbatch_extra[@]}"} \
                --wrap "$(printf '%q ' "${cmd[@]}")" &
            pids+=($!)
        else
            say "training $(model_of $run) -> $RUNS/$run"
            "${cmd[@]}"
        fi
    done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid"; done
fi

# ---------------------------------------------------------------------------------------------------- 2. analyze
if has_stage analyze; then
    pids=()
    for run in bn nobn; do
        checkpoints="$RUNS/$run/ckpt_*.pt"   # a glob hessspec expands (not the directory: last.pt is resume state)
        out="$RESULTS/$run.h5"
        args=(--model "$(model_of $run)" --data "cifar10:$CIFAR10_ROOT" --batch-size "$BATCH_SIZE"
              --lanczos-steps "$LANCZOS_STEPS" --probes "$PROBES" --top-k "$TOP_K" --dtype "$DTYPE"
              --label "$(label_of $run)" ${analyze_extra[@]+"${analyze_extra[@]}"})
        [[ -n "$SAMPLES" ]] && args+=(--samples "$SAMPLES")
        case "$MODE" in
        local)
            say "analysing $checkpoints -> $out"
            "${hessspec[@]}" analyze "$checkpoints" "${args[@]}" --device "$DEVICE" --out "$out"
            ;;
        gpus)
            say "analysing $checkpoints -> $out on $NPROC GPUs"
            "${torchrun[@]}" --standalone --nproc-per-node "$NPROC" -m hessspec analyze "$checkpoints" "${args[@]}" \
                --device cuda --out "$out"
            ;;
        slurm)
            mkdir -p "$LOGS"
            say "analysing $checkpoints -> $out as an array of $ARRAY_TASKS tasks (waiting for it)"
            (
                export CHECKPOINTS="$checkpoints" MODEL="$(model_of $run)" DATA="cifar10:$CIFAR10_ROOT" OUT="$out"
                device=$DEVICE; [[ $device == auto ]] && device=cuda
                export LABEL="$(label_of $run)" SAMPLES BATCH_SIZE LANCZOS_STEPS PROBES TOP_K DTYPE DEVICE="$device"
                export EXTRA_ARGS="$ANALYZE_ARGS" HESSSPEC
                sbatch --wait --array="0-$((ARRAY_TASKS - 1))" --job-name="hessspec-$run" \
                    --output="$LOGS/%x-%A_%a.out" ${sbatch_extra[@]+"${sbatch_extra[@]}"} \
                    "$SCRIPTS/slurm/analyze_array.sbatch"
                bash "$SCRIPTS/slurm/analyze_array.sbatch" merge
            ) &
            pids+=($!)
            ;;
        esac
    done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid"; done
fi

# ------------------------------------------------------------------------------------------------------- 3. plot
if has_stage plot; then
    say "plotting into $RESULTS"
    "${hessspec[@]}" plot density "$RESULTS/bn.h5" --out "$RESULTS/density_bn.png"
    "${hessspec[@]}" plot density "$RESULTS/nobn.h5" --out "$RESULTS/density_nobn.png"
    "${hessspec[@]}" plot evolution "$RESULTS/nobn.h5" "$RESULTS/bn.h5" --out "$RESULTS/evolution.png"
    "${hessspec[@]}" info "$RESULTS/nobn.h5" "$RESULTS/bn.h5" > "$RESULTS/summary.txt"
    say "done: $RESULTS/{density_bn.png,density_nobn.png,evolution.png,summary.txt}"
fi
