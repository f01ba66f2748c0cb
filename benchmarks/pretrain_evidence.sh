#!/usr/bin/env bash
# Issue 11's evidence on 2 CPU cores, from the repository root:
#   bash benchmarks/pretrain_evidence.sh
# 1. pre-train the small BEiT on 5,254 unlabelled images (configs/pretrain/breastmnist_chest_28.yaml);
# 2. fine-tune it on BreastMNIST (all layers; top 2 blocks) and the same BEiT from scratch, 3 seeds
#    each, two cells at a time (configs/study/pretrain_breastmnist_28.yaml);
# 3. the table with paired tests against scratch; copies land in benchmarks/results_cpu/pretrain_breastmnist_28/.
# Wall times are printed and kept in timing.txt.
set -euo pipefail
OUT=benchmarks/results_cpu/pretrain_breastmnist_28
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
hf-medbeit pretrain configs/pretrain/breastmnist_chest_28.yaml
pretrained=$(date +%s)
# Two cells side by side, one thread each (2 cores): faster than one at a time for models this small.
OMP_NUM_THREADS=1 hf-medbeit study configs/study/pretrain_breastmnist_28.yaml --shard 0/2 &
OMP_NUM_THREADS=1 hf-medbeit study configs/study/pretrain_breastmnist_28.yaml --shard 1/2
wait
hf-medbeit study configs/study/pretrain_breastmnist_28.yaml --table
end=$(date +%s)
{
    echo "pre-training: $((pretrained - start)) s"
    echo "fine-tuning grid (9 runs, 2 at a time): $((end - pretrained)) s"
    echo "total: $((end - start)) s on $(nproc) CPU cores"
} | tee "$OUT/timing.txt"
cp runs/study/pretrain-breastmnist-28/results.{md,csv} runs/study/pretrain-breastmnist-28/results_auc.png "$OUT/"
cp runs/pretrain/beit-mim-breastmnist-chest-28/{README.md,all_results.json,pretraining_loss.png} "$OUT/"
mv "$OUT/README.md" "$OUT/pretraining_model_card.md"
mv "$OUT/all_results.json" "$OUT/pretraining_all_results.json"
