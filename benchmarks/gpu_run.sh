#!/usr/bin/env bash
# The GPU throughput runs, in one go (under 9 minutes on an H100/H200), from the repo root:
#
#     bash benchmarks/gpu_run.sh
#
# On the project's GPU machine (no network) the missing packages travel as wheels in .whl/
# (see benchmarks/README.md); they are installed to /tmp/site. Results: JSON and logs in $OUT
# (default benchmarks/results/). Each run has a time limit, so one that hangs cannot eat the
# others' time. Rehearsal on a CPU machine: BENCH_TINY=1 SKIP_WHEELS=1 PYTHON=.venv/bin/python.
set -uo pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
BUDGET_S=${BUDGET_S:-480}  # everything after the install, compile run included
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}  # a fresh compile cache: no stale kernels
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -z "${SKIP_WHEELS:-}" && -d .whl ]]; then
    echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PYTHON" - <<'EOF' || exit 1
import torch, torchvision, transformers, datasets, medmnist, numpy, pyarrow
import hf_medbeit.fast_path, hf_medbeit.training
print("python", __import__("platform").python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "datasets", datasets.__version__, "numpy", numpy.__version__,
      "pyarrow", pyarrow.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF

# The fast path on this device against the image processor on the CPU, same images.
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/parity.log"
import numpy as np, torch
from PIL import Image
from transformers import BeitImageProcessor
from hf_medbeit.fast_path import DevicePreprocessor
device = "cuda" if torch.cuda.is_available() else "cpu"
processor = BeitImageProcessor()
rng = np.random.default_rng(0)
# Gray (N, H, W) and RGB (N, H, W, 3), handed over channels-last as UInt8ImageDataset does.
for kind, images in (("gray", rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)),
                     ("rgb", rng.integers(0, 256, size=(64, 28, 28, 3), dtype=np.uint8))):
    expected = processor([Image.fromarray(i).convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    batch = torch.from_numpy(images)
    batch = (batch[..., None] if batch.ndim == 3 else batch).permute(0, 3, 1, 2)
    actual = DevicePreprocessor(processor)(batch.to(device)).cpu()
    print(f"parity on {device}, {kind}: max |fast - processor| = {(actual - expected).abs().max().item():.3g} "
          f"(one uint8 step = {1 / 127.5:.3g}); mean {(actual - expected).abs().mean().item():.3g}; "
          f"contiguous {actual.is_contiguous()}")
EOF

if [[ -n "${BENCH_TINY:-}" ]]; then  # CPU rehearsal: same commands, tiny model, few steps
    BASE=tiny; LARGE=tiny; STEPS="--steps 2 --warmup 1 --data_batches 2 --inference_images 256 --pipeline_images 8 --device cpu"
else
    BASE=base; LARGE=large; STEPS="--steps 40 --warmup 10 --data_batches 30 --inference_images 4096 --pipeline_images 128"
fi

run() {  # run NAME SECONDS ARGS...: one throughput.py process with a time limit and a log
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - SECONDS))
    (( limit > left )) && limit=$left
    if (( limit < 30 )); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
    echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/throughput.py "$@" --out "$OUT/$name.json" 2>&1 \
        | grep --line-buffered -v "examples/s\]" | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s"
}

SECONDS=0
# BEiT-base, all layers trained; BEiT-large, the study's top 5 layers. 28x28 -> 224, bf16.
run throughput_base 130 --model $BASE --batch_size 32 128 $STEPS
# Eager attention: BEiT-large's SDPA backward failed on torch 2.11 ("LSE is not correctly aligned").
# (The data path and inference do not depend on the model's size: measured once, with base.)
run throughput_large 150 --model $LARGE --attn_implementation eager --batch_size 32 128 --skip data inference $STEPS
# torch.compile on our path, BEiT-base at batch 128, last because compiling is slow (it did not
# finish within 100 s on the H200; it gets what is left of the budget).
run throughput_base_compile 400 --model $BASE --batch_size 128 --compile --skip study model ours data inference $STEPS

echo "== done in ${SECONDS}s; results:"
ls -l "$OUT"
