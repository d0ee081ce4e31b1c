"""Few-shot MAEDAY fine-tuning, runnable under `accelerate launch` (same options as `maeday finetune`).

    accelerate launch --cpu --num_processes 1 scripts/finetune.py --model facebook/vit-mae-base \
        --shots bottle/train/good/000.png --output-dir bottle-1shot
    accelerate launch --num_processes 4 scripts/finetune.py ...   # DDP, per-GPU batch 32 / 4
"""

from __future__ import annotations

import sys

from maeday_hf.cli import main, skip_the_final_collection_at_exit

if __name__ == "__main__":
    skip_the_final_collection_at_exit()
    sys.exit(main(["finetune", *sys.argv[1:]]))
