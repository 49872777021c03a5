#!/usr/bin/env bash
# One call on a lent GPU machine: bench/gpu_check.py (the cuda tests, then timings), then a training
# burst of the two capture-range recipes one after the other, each from its shipped weights (CARL:
# the recipe bench/gpu_carry.py carried as .gpu-carry/train-config.json, its TRAIN_RECIPE, for the
# burst's minutes; then the displacement-only baseline, the unet-brain-3d recipe of the same name,
# to CARL's step, so that the two compare like with like), on the label maps that
# bench/gpu_carry.py resampled onto their common box. Under OUT come back the check's files and both runs' logs in
# session.tar.gz, each run's model.pt (the weights that ship, the average with ema_decay) as
# RUN.model.pt, and each run's checkpoint.pt in 15 MiB parts while they fit (the tool returns files
# of at most 16 MiB, 64 MiB in all); `cat NAME.part-* > checkpoint.pt` rebuilds it, and the run
# resumes on any device. The runs are written to build/gpu-runs (ignored: kept while the machine
# stays warm), so a checkpoint over the total is fetched by a second call at once:
# `bash bench/gpu_session.sh fetch $OUT RUN`.
#
# Prepare here: make gpu-carry. The device call:
# run(command="bash bench/gpu_session.sh $OUT 2.5 2.75", carry=[".gpu-carry"], timeout_s=595): 483 s on an H100
# on 2026-12-05 (957 steps of each run); a training minute more costs up to two (both runs).
# Arguments: OUT, the check's budget in minutes, CARL's minutes (the displacement-only run, faster
# per step, gets as many at most). PY names the interpreter.
set -u
runs=build/gpu-runs
if [ "${1:-}" = fetch ]; then
    split -b 15M "$runs/${3:?usage: gpu_session.sh fetch OUT RUN}/checkpoint.pt" "${2:?}/$3.part-"
    exit
fi
out=${1:?usage: gpu_session.sh OUT CHECK_MINUTES TRAIN_MINUTES}
check_minutes=${2:?}
train_minutes=${3:?}
py=${PY:-python3}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$work/check"

# its budget skips rows; the timeout ends a row that outlives it
timeout "$(awk "BEGIN {print $check_minutes * 60 + 30}")" \
    $py bench/gpu_check.py --carry .gpu-carry --out "$work/check" --budget-minutes "$check_minutes" \
    > "$work/check/gpu-check.log" 2>&1
echo "gpu_check: exit $?"

$py -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import gpu_carry; \
gpu_carry.unpack_site(Path('.gpu-carry'), Path('$work/site'))" || exit 1
export PYTHONPATH="$work/site:CARLRegistration${PYTHONPATH:+:$PYTHONPATH}"
# the runs are named as their recipes: carl-brain-3d-NAME and unet-brain-3d-NAME
carl=$(basename "$($py -c "import json; print(json.load(open('.gpu-carry/train-config.json'))['output'])")")
unet=${carl/carl-brain/unet-brain}
common=(--device "${DEVICE:-cuda}" --max-minutes "$train_minutes" --progress json --set checkpoint_every=100)
$py -m carlreg train --config .gpu-carry/train-config.json --set output=$runs/$carl \
    "${common[@]}" > "$work/carl-train.log" 2>&1
step_of() { $py -c "import torch; print(torch.load('$runs/$1/checkpoint.pt', weights_only=True)['step'])"; }
steps=$(step_of "$carl") || exit 1
$py -m carlreg train --config weights/training/$unet.json --set output=$runs/$unet --max-steps "$steps" \
    --set data_folder=.gpu-carry/data/synthseg_label_maps "${common[@]}" > "$work/unet-train.log" 2>&1
echo "steps: $carl $steps, $unet $(step_of "$unet")"
# what ships comes back first; the checkpoints, for resuming, in the room left
room=$(( 60 * 2**20 - $(stat -c %s "$runs/$carl/model.pt") - $(stat -c %s "$runs/$unet/model.pt") ))
for run in $carl $unet; do
    cp "$runs/$run/model.pt" "$out/$run.model.pt"
    tail -n 2 "$runs/$run/log.jsonl"
    mkdir -p "$work/$run" && cp "$runs/$run"/{log.jsonl,config.json} "$work/$run/"
    size=$(stat -c %s "$runs/$run/checkpoint.pt")
    if [ "$size" -le "$room" ]; then
        split -b 15M "$runs/$run/checkpoint.pt" "$out/$run.part-" && room=$(( room - size ))
    else
        echo "$run/checkpoint.pt left on the machine (over the tool's total): bash bench/gpu_session.sh fetch \$OUT $run"
    fi
done
tar -czf "$out/session.tar.gz" -C "$work" check carl-train.log unet-train.log $carl $unet
ls -la "$out"
