#!/usr/bin/env bash
# FLAME on a model with BatchNorm: the half-width ResNet-18 on non-IID synthetic 3x32x32 data
# (Dirichlet alpha 0.1, no attack), clustering on trainable parameters only vs the whole
# state_dict (BatchNorm running statistics included), for both admission rules. A clean start
# model is pretrained on demand (5 FedAvg rounds, shared by the four runs), then 3 FLAME rounds,
# 10 of 20 clients per round.
#   bash experiments/flame_batchnorm.sh
# Results go to experiments/results/flame_batchnorm/<vectors>_<rule>/;
# `python experiments/report.py --flame-batchnorm` tabulates benign admission.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
threads=(${THREADS:+--threads "$THREADS"})
START=experiments/results/flame_batchnorm/pretrain/model_last.pt.tar.epoch_5
for whole in false true; do
  for rule in cluster outlier_score; do
    out="experiments/results/flame_batchnorm/$([ $whole = true ] && echo whole_state_dict || echo trainable)_${rule}"
    [ -f "$out/summary.json" ] && continue
    rm -rf "$out"
    "$PY" main.py --params utils/cifar.yaml --run-dir "$out" "${threads[@]}" \
      --set type=synthetic --set model=ResNet18 --set "synthetic_shape=[3, 32, 32]" \
      --set synthetic_train_size=6000 --set synthetic_test_size=500 \
      --set number_of_total_participants=20 --set no_models=10 --set dirichlet_alpha=0.1 \
      --set resumed_model=true --set "resumed_model_name=$START" --set is_poison=false \
      --set invert=false --set epochs=8 --set internal_epochs=2 --set lr_para=1.0 --set aggregation_methods=flame \
      --set "flame_whole_state_dict=$whole" --set "flame_admission=$rule" --set seed=1 \
      --set "adversary_list=[16, 17, 18, 19]" --set "save_on_epochs=[]"
  done
done
