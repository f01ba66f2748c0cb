#!/usr/bin/env bash
# The study's evidence grid (BreastMNIST 28: tiny BEiT, ResNet-18 (28), ResNet-50 (28), weighted
# loss vs none, 3 seeds = 18 cells) on one GPU, from the repo root:
#
#     bash benchmarks/gpu_study.sh [GRID.yaml]
#
# One GPU runs N_SHARDS `hf-medbeit study --shard i/N` commands side by side (the cells are small;
# one at a time would leave the GPU idle while each process starts), then writes the table. Missing
# packages travel as wheels in .whl/ (see benchmarks/README.md). What comes back ($OUT): the table,
# CSV and figure, and a tarball of every cell's all_results.json, test_predictions.csv, config and log.
# Rehearsal on a CPU: SKIP_WHEELS=1 PYTHON=/path/to/venv/python N_SHARDS=2 bash benchmarks/gpu_study.sh GRID
set -uo pipefail

GRID=${1:-configs/study/breastmnist_cpu_grid.yaml}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
N_SHARDS=${N_SHARDS:-6}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -z "${SKIP_WHEELS:-}" && -d .whl ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PYTHON" -c "import torch, transformers, datasets, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1

# Convert the data once, before the shards start (they would race to build the same cache).
"$PYTHON" -c "from hf_medbeit.data import load_medmnist; load_medmnist('breastmnist', data_dir='tests/data')" || exit 1
"$PYTHON" -m hf_medbeit.cli study "$GRID" --list || exit 1

started=$(date +%s)
for ((i = 0; i < N_SHARDS; i++)); do
    timeout "$BUDGET_S" "$PYTHON" -m hf_medbeit.cli study "$GRID" --shard "$i/$N_SHARDS" > "$OUT/shard$i.log" 2>&1 &
done
wait
echo "== shards done in $(( $(date +%s) - started )) s"
tail -n 3 "$OUT"/shard*.log
"$PYTHON" -m hf_medbeit.cli study "$GRID" --list
"$PYTHON" -m hf_medbeit.cli study "$GRID" --table

ROOT=$("$PYTHON" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$GRID")
cp "$ROOT"/results.md "$ROOT"/results.csv "$ROOT"/results_auc.png "$OUT"/ 2>/dev/null
(cd "$ROOT" && tar czf "$OUT/cells.tar.gz" --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.bin' \
    --exclude='runs' --exclude='*.png' -- *.yaml *.log */all_results.json */test_predictions.csv */trainer_state.json 2>/dev/null)
cat "$OUT/shard"*.log > "$OUT/shards.log"; rm -f "$OUT"/shard[0-9]*.log
ls -la "$OUT"
cat "$OUT/results.md" 2>/dev/null
