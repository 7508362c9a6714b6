#!/usr/bin/env bash
# Recipe (not run in CI): AdaQAT on ResNet-20 / CIFAR-10 from a user's local copy of the data set.
# Paper reference (one global N_w/N_a, first/last layer 8 bit): 92.1 % at W3/A4.
#   usage: benchmarks/adaqat_resnet20_cifar10.sh /path/to/cifar-10-batches-py [runs/adaqat_r20] [cuda]
# Multi-GPU: replace `bitfold train` by `torchrun --nproc_per_node=N -m bitfold.cli train`.
set -euo pipefail
DATA=${1:?path to the extracted cifar-10-batches-py folder}
OUT=${2:-runs/adaqat_r20}
DEVICE=${3:-cuda}
# 1) float-init-free QAT from 8 bit; widths learn against BitOPs; 10 fine-tune epochs at frozen widths
bitfold train --model resnet20 --data cifar10 --data-dir "$DATA" --method adaqat --bits w8a8 \
  --cost bitops --lam 0.1 --bit-lr 0.01 --finetune-epochs 10 --epochs 200 --batch-size 128 --lr 1e-3 \
  --device "$DEVICE" -o "$OUT"
# 2) verified exports of the learned mixed-precision model
bitfold export "$OUT" --format qonnx
bitfold export "$OUT" --format qcdq
cat "$OUT/learned_bitmap.json"
