#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent), write the AMOS-like phantom cohort, give every site
# the shared CPU plans and preprocess it, then train one task (kidneys) at one site with FedDAHTrainer
# through the unmodified `nnUNetv2_train` command. Everything lands in ./work/demo (or $FEDDAH_WORK).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
work="${FEDDAH_WORK:-$repo/work/demo}"
mkdir -p "$work"
export PATH="$repo/.venv/bin:$PATH"
eval "$(nnfeddah env --root "$work")"
start=$(date +%s)

echo "== 1/3 phantom cohort: 4 sites -> $nnUNet_raw"
nnfeddah phantom --out "$nnUNet_raw" --sites 4 --train 6 --test 2 --seed 0 --first-id 501

echo "== 2/3 shared plans (FedDAHPlansCPU) + nnU-Net preprocessing for every site"
nnfeddah plans install --template cpu -d 501 502 503 504

echo "== 3/3 one FedDAH round at site 1: task 'kidneys', via nnUNetv2_train -tr FedDAHTrainer"
round="$work/rounds/site1_kidneys"
mkdir -p "$round"
cat > "$round/round.json" <<JSON
{"task": "kidneys", "output_weights": "weights.safetensors", "output_metrics": "metrics.json",
 "epochs": 2, "iterations_per_epoch": 5, "val_iterations_per_epoch": 2, "epoch_offset": 0, "total_epochs": 20,
 "seed": 0}
JSON
FEDDAH_ROUND_CONFIG="$round/round.json" nnUNetv2_train 501 3d_fullres 0 -tr FedDAHTrainer -p FedDAHPlansCPU \
  -device cpu > "$round/nnUNetv2_train.log" 2>&1 || { tail -40 "$round/nnUNetv2_train.log"; exit 1; }

python - "$round/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"task {m['task']} at {m['dataset']}: {m['iterations']} iterations, "
      f"{m['seconds_per_iteration']:.2f} s/iteration, final train loss {m['train_loss']:.3f}")
print("validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in m["dice"].items()))
print(f"trained weights: {m['weights_file']}")
print(f"metrics:         {sys.argv[1]}")
PY
echo "log:             $round/nnUNetv2_train.log"
echo "demo finished in $(( $(date +%s) - start )) s (work folder: $work)"
