#!/usr/bin/env bash
# Fashion-MNIST: {single-shot, continuous} DBA x {no defense, FLIP, FLAME, the robust baselines},
# from our clean round-200 model, seed 1, to round LAST (default 218: ten rounds after the last
# single-shot attack). A defense is none, flip or any `aggregation_methods` name. FLAME runs with
# flame_admission: cluster, the rule of the public FLAME implementations, as the results table says.
#   bash experiments/fmnist.sh                 # none, flip and flame for both attacks
#   bash experiments/fmnist.sh single_shot flame   # one of them
#   bash experiments/fmnist.sh "single_shot continuous" "$(echo $BASELINES)"   # see BASELINES below
#   THREADS=1 bash experiments/fmnist.sh single_shot flip   # on one core (main.py --threads)
#   RESULTS=experiments/results/horizon LAST=300 bash experiments/fmnist.sh   # the authors' horizon
# Results go to ${RESULTS:-experiments/results}/<attack>_<defense>/; experiments/report.py tabulates them.
# A run folder with a checkpoint is resumed (a finished one only rewrites its summary).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LAST="${LAST:-218}"
threads=(${THREADS:+--threads "$THREADS"})
attacks="${1:-single_shot continuous}"
defenses="${2:-none flip flame}"
BASELINES="krum multi_krum bulyan median trimmed_mean rfa foolsgold norm_clipping weak_dp fltrust"
for attack in $attacks; do
  for defense in $defenses; do
    case "$defense" in
      none)  flags=(--set invert=false --set aggregation_methods=mean) ;;
      flip)  flags=(--set invert=true --set aggregation_methods=mean) ;;
      flame) flags=(--set invert=false --set aggregation_methods=flame --set flame_admission=cluster) ;;
      *)     flags=(--set invert=false --set "aggregation_methods=$defense") ;;
    esac
    if [ "$attack" = continuous ]; then
      flags+=(--set attack_mode=continuous)
      for k in 0 1 2 3; do flags+=(--set "${k}_poison_epochs=null"); done
    fi
    out="${RESULTS:-experiments/results}/${attack}_${defense}"
    if [ -f "$out/checkpoint_full.pt" ]; then
      "$PY" main.py --resume "$out" --set "epochs=$LAST" "${threads[@]}"
    else
      "$PY" main.py --params utils/fashion_mnist.yaml --run-dir "$out" --set "epochs=$LAST" \
        --set seed=1 "${flags[@]}" "${threads[@]}"
    fi
  done
done
