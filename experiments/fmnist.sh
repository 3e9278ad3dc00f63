#!/usr/bin/env bash
# Fashion-MNIST: {single-shot, continuous} DBA x {no defense, FLIP, FLAME}, from our clean round-200
# model, seed 1, to round LAST (default 218: ten rounds after the last single-shot attack).
#   bash experiments/fmnist.sh                 # all six runs
#   bash experiments/fmnist.sh single_shot flame   # one of them
#   THREADS=1 bash experiments/fmnist.sh single_shot flip   # on one core (main.py --threads)
# Results go to experiments/results/<attack>_<defense>/; experiments/report.py tabulates them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LAST="${LAST:-218}"
threads=(${THREADS:+--threads "$THREADS"})
attacks="${1:-single_shot continuous}"
defenses="${2:-none flip flame}"
for attack in $attacks; do
  for defense in $defenses; do
    case "$defense" in
      none)  flags=(--set invert=false --set aggregation_methods=mean) ;;
      flip)  flags=(--set invert=true --set aggregation_methods=mean) ;;
      flame) flags=(--set invert=false --set aggregation_methods=flame) ;;
    esac
    if [ "$attack" = continuous ]; then
      flags+=(--set attack_mode=continuous)
      for k in 0 1 2 3; do flags+=(--set "${k}_poison_epochs=null"); done
    fi
    out="experiments/results/${attack}_${defense}"
    if [ -f "$out/checkpoint_full.pt" ]; then
      "$PY" main.py --resume "$out" --set "epochs=$LAST" "${threads[@]}"
    else
      "$PY" main.py --params utils/fashion_mnist.yaml --run-dir "$out" --set "epochs=$LAST" \
        --set seed=1 "${flags[@]}" "${threads[@]}"
    fi
  done
done
