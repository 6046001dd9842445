#!/usr/bin/env bash
# The full CIFAR versions of the two comparisons (docs/RESULTS.md section 11), ready for a machine with GPUs
# and the CIFAR files (torchvision's layout under $DEEPPLAIN_DATA, or add --download with network access):
#
#   DEEPPLAIN_DATA=/data GPUS=0,1 bash benchmarks/gpu_experiments.sh            # train (resumable: run it again)
#   DRY_RUN=1 bash benchmarks/gpu_experiments.sh                                 # check and list, train nothing
#
# skips: PlainNet / ResNet / ResNeXt at 164 layers with He et al.'s ResNet-164 recipe (164 epochs, SGD 0.1, /10 at
# 50% and 75%), on CIFAR-10 and CIFAR-100. coursework: the report's seven rows on CIFAR-100 itself (each preset's
# recipe: Adam 1e-3, cosine, batch 100, 100 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS="${GPUS:-0}"
common=(--gpus "$GPUS" --parallel "$(tr ',' '\n' <<<"$GPUS" | wc -l)")
if [[ -n "${DRY_RUN:-}" ]]; then common+=(--dry-run); fi
for dataset in cifar10 cifar100; do
    python -m deepplain.comparisons skips --dataset "$dataset" --epochs 164 --out "results/skips-164-$dataset" \
        "${common[@]}" -- --diag-every 1000
done
python -m deepplain.comparisons coursework --dataset cifar100 --epochs 100 --out results/coursework-cifar100 \
    "${common[@]}" -- --diag-every 1000
