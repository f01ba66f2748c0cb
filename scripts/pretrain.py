"""Pre-train a BEiT by masked image modeling on unlabelled medical images.

    python scripts/pretrain.py --sources breastmnist /path/to/scans --output_dir runs/beit-mim
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/pretrain.py configs/pretrain/medmnist_all_224.yaml

The same entry as `hf-medbeit pretrain`. The recipe, step by step (arguments -> unlabelled images
-> model -> targets -> Trainer with masks -> pre-trained model and card), is `hf_medbeit/pretrain.py`.
"""

from hf_medbeit.errors import run_with_user_errors
from hf_medbeit.pretrain import main

if __name__ == "__main__":
    run_with_user_errors(main)
