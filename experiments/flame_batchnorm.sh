#!/usr/bin/env bash
# FLAME on a model with BatchNorm: MnistNetBN (MnistNet with BatchNorm after each convolution) on
# real Fashion-MNIST, Dirichlet alpha 0.1, no attack; clustering on the trainable parameters only vs
# the whole state_dict (BatchNorm running statistics included), for both admission rules. A clean
# start model is pretrained on demand (30 FedAvg rounds, shared by the four runs), then 5 FLAME
# rounds (31-35), seed 1.
#   bash experiments/flame_batchnorm.sh
# Results go to experiments/results/flame_batchnorm/<vectors>_<rule>/;
# `python experiments/report.py --flame-batchnorm` tabulates benign admission.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
threads=(${THREADS:+--threads "$THREADS"})
START=experiments/results/flame_batchnorm/pretrain/model_last.pt.tar.epoch_30
for whole in false true; do
  for rule in cluster outlier_score; do
    out="experiments/results/flame_batchnorm/$([ $whole = true ] && echo whole_state_dict || echo trainable)_${rule}"
    [ -f "$out/summary.json" ] && continue
    rm -rf "$out"
    "$PY" main.py --params utils/fashion_mnist.yaml --run-dir "$out" "${threads[@]}" \
      --set model=MnistNetBN --set dirichlet_alpha=0.1 --set "resumed_model_name=$START" \
      --set is_poison=false --set invert=false --set epochs=35 --set aggregation_methods=flame \
      --set "flame_whole_state_dict=$whole" --set "flame_admission=$rule" --set seed=1 \
      --set "save_on_epochs=[]"
  done
done
