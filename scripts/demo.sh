#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent), write the AMOS-like phantom cohort (4 sites), then run
# the whole FedDAH federation of plans/phantom_4site.json over real Flower processes on 127.0.0.1 (TLS,
# authenticated SuperNodes): first its fingerprint round (every site sends nnU-Net fingerprint statistics, no
# voxel; the coordinator plans the shared CPU plans from their merge; every site installs and preprocesses),
# then every site's task stream to its end; evaluate every task after every time step (Dice matrix, forgetting, BWT,
# plots), and finally replay the same stream in-process under FedAvg (site rounds identical for both are
# not trained again) to show what FedAvg forgets of the old tasks. Everything lands in ./work/demo (or
# $FEDDAH_WORK); re-running it resumes.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
work="${FEDDAH_WORK:-$repo/work/demo}"
plan="${FEDDAH_PLAN:-$repo/plans/phantom_4site.json}"
mkdir -p "$work"
export PATH="$repo/.venv/bin:$PATH"
eval "$(nnfeddah env --root "$work")"
start=$(date +%s)

echo "== 1/4 phantom cohort: 4 sites -> $nnUNet_raw"
nnfeddah phantom --out "$nnUNet_raw" --sites 4 --train 6 --test 2 --seed 0 --first-id 501

echo "== 2/4 federation: $plan (fingerprint round -> shared FedDAHPlansCPU at every site, then FedDAH; Flower on loopback)"
python -m nnunet_feddah.coordinate --plan "$plan" --state "$work/state" --work "$work/sites" --local

echo "== 3/4 evaluation: every task after every time step on each site's held-out cases -> $work/eval"
nnfeddah evaluate --plan "$plan" --state "$work/state" --out "$work/eval"
cat "$work/eval/report.md"

echo "== 4/4 the same stream under FedAvg (in-process; identical site rounds replayed) -> $work/fedavg"
nnfeddah compare --plan "$plan" --state "$work/state" --sites-work "$work/sites" --out "$work/fedavg" \
  --evaluation "$work/eval/evaluation.json"

echo "demo finished in $(( $(date +%s) - start )) s (work folder: $work)"
echo "plots: $work/eval/*.png   FedDAH vs FedAvg: $work/fedavg/comparison.json"
