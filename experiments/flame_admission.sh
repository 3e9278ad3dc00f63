#!/usr/bin/env bash
# FLAME admission rules (`cluster` vs `outlier_score`) on Fashion-MNIST from our clean round-200
# model, seed 1: benign-only, single-shot and continuous DBA at Dirichlet alpha 0.1, 0.5, 1.0 and
# IID. Rounds: single-shot 201-208 (all four attacks), benign-only and continuous 201-206.
#   bash experiments/flame_admission.sh                       # every run (about 70 min on one core)
#   bash experiments/flame_admission.sh continuous "0.5"      # some of them
#   OUTLIER_MAX=0.5 bash experiments/flame_admission.sh continuous "0.1" outlier_score
#                               # flame_outlier_max 0.5, today's default (folder suffix _max<value>);
#                               # without OUTLIER_MAX the outlier_score runs use 2/3
#                               # (cluster runs do not read it)
# Results go to experiments/results/flame_admission/<scenario>_<alpha>_<rule>/;
# `python experiments/report.py --flame-admission` tabulates them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
threads=(${THREADS:+--threads "$THREADS"})
scenarios="${1:-benign single_shot continuous}"
alphas="${2:-0.1 0.5 1.0 iid}"
rules="${3:-cluster outlier_score}"
for scenario in $scenarios; do
  for alpha in $alphas; do
    for rule in $rules; do
      out="experiments/results/flame_admission/${scenario}_${alpha}_${rule}${OUTLIER_MAX:+_max$OUTLIER_MAX}"
      [ -f "$out/summary.json" ] && continue
      flags=(--set invert=false --set aggregation_methods=flame --set "flame_admission=$rule" --set seed=1)
      flags+=(--set "flame_outlier_max=${OUTLIER_MAX:-0.6667}")
      case "$scenario" in
        benign)      flags+=(--set is_poison=false --set epochs=206) ;;
        single_shot) flags+=(--set epochs=208) ;;
        continuous)  flags+=(--set attack_mode=continuous --set epochs=206)
                     for k in 0 1 2 3; do flags+=(--set "${k}_poison_epochs=null"); done ;;
      esac
      if [ "$alpha" = iid ]; then
        flags+=(--set sampling_dirichlet=false)
      else
        flags+=(--set "dirichlet_alpha=$alpha")
      fi
      rm -rf "$out"
      "$PY" main.py --params utils/fashion_mnist.yaml --run-dir "$out" "${flags[@]}" "${threads[@]}"
    done
  done
done
