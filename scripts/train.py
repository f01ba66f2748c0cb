"""Fine-tune BEiT (or any Hugging Face image classifier) on a MedMNIST data set.

    python scripts/train.py --dataset_name breastmnist --output_dir runs/beit-breast
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train.py configs/study/<experiment>.yaml

This is the same entry as `hf-medbeit train`. The recipe itself, step by step (arguments -> data
-> balancing -> model -> transforms -> Trainer -> test -> results), is `hf_medbeit/finetune.py`:
it lives in the package so that the installed console command runs it too.
"""

from hf_medbeit.errors import run_with_user_errors
from hf_medbeit.finetune import main

if __name__ == "__main__":
    run_with_user_errors(main)
