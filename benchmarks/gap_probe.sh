#!/usr/bin/env bash
# Where does our Trainer lose time against the model alone at batch 128 (BEiT-base, bf16)?
# (b) with Trainer features switched off one at a time. On the GPU machine, from the repo root,
# with .whl carried (see README.md):  bash benchmarks/gap_probe.sh   (JSON in $OUT)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
B="python3 benchmarks/throughput.py --model base --batch_size 128 --steps 40 --warmup 10 --skip study data inference"
timeout 90 $B --out ${OUT:-benchmarks/results}/gap_default.json 2>&1 | grep -E "images/s|Error"
timeout 60 $B --skip study data inference model --trainer_overrides '{"max_grad_norm": 0}' --out ${OUT:-benchmarks/results}/gap_noclip.json 2>&1 | grep -E "images/s|Error"
timeout 60 $B --skip study data inference model --trainer_overrides '{"logging_steps": 1000}' --out ${OUT:-benchmarks/results}/gap_nolog.json 2>&1 | grep -E "images/s|Error"
timeout 60 $B --skip study data inference model --trainer_overrides '{"max_grad_norm": 0, "logging_steps": 1000, "dataloader_pin_memory": false}' --out ${OUT:-benchmarks/results}/gap_all.json 2>&1 | grep -E "images/s|Error"
