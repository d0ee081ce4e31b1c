#!/usr/bin/env python
"""Does the few-shot fine-tune help where the MAE never saw the kind of image? Zero- vs k-shot on the synthetic set.

The paper's few-shot gain is largest on objects, which its ImageNet MAE reconstructs less well than textures. Offline
there is no ImageNet MAE, so this study makes the same situation small: a ViTMAE is pretrained on synthetic *textures*
only (`maeday_hf.small_mae`), then `maeday-evaluate` scores every synthetic category zero-shot and after the paper's
LoRA fine-tune on k normal shots (its defaults: rank 32, SGD lr 1e-2, 50 steps of 32 views), over several shot
selections. Textures are in-domain (zero-shot should already do well), objects are not.

    python scripts/study_few_shot.py --output-dir results-few-shot       # about 15 min on 2 CPU cores

Rerunning the same command continues where it stopped (the pretrained model and the protocol's units are kept in
--output-dir). Prints `maeday-evaluate`'s tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from maeday_hf.commands import evaluate
from maeday_hf.small_mae import PATCH_SIZE, pretrain_small_mae
from maeday_hf.data import load_synthetic_dataset
from maeday_hf.synthetic import CATEGORIES, MIN_IMAGE_SIZE, TEXTURE_CATEGORIES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="the model, the data and the protocol's results")
    parser.add_argument("--pretrain-categories", nargs="+", choices=CATEGORIES, default=list(TEXTURE_CATEGORIES))
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES),
                        help="categories evaluated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-images", type=int, default=200, help="normal images per pretraining category")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--num-train", type=int, default=8, help="normal images per category to pick shots from")
    parser.add_argument("--num-test-good", type=int, default=20)
    parser.add_argument("--num-test-per-defect", type=int, default=7, help="test images per defect type (3 types)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--shot-seeds", type=int, default=3)
    parser.add_argument("--num-masks", type=int, default=32)
    parser.add_argument("--finetune-steps", type=int, default=50, help="the paper's 50 by default")
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-2, help="the paper's 1e-2 by default")
    args = parser.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE or args.image_size % PATCH_SIZE:
        parser.error(f"--image-size must be a multiple of {PATCH_SIZE} (the patch size) >= {MIN_IMAGE_SIZE}, got "
                     f"{args.image_size}")
    for name in ("pretrain_images", "pretrain_steps", "shot_seeds", "num_masks", "finetune_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.shots) < 0 or max(args.shots) > args.num_train:
        parser.error(f"--shots must be in [0, --num-train = {args.num_train}], got {args.shots}")

    output_dir = Path(args.output_dir)
    model = output_dir / "small-mae"
    record_path = output_dir / "pretraining.json"
    pretraining = dict(categories=args.pretrain_categories, image_size=args.image_size,
                       num_train=args.pretrain_images, steps=args.pretrain_steps)
    if not record_path.is_file() or json.loads(record_path.read_text()).get("settings") != pretraining:
        output_dir.mkdir(parents=True, exist_ok=True)
        record = pretrain_small_mae(model, **pretraining)
        record_path.write_text(json.dumps({"settings": pretraining, **record}, indent=2) + "\n")
    record = json.loads(record_path.read_text())
    print(json.dumps({key: record[key] for key in ("pretrained", "categories", "steps", "seconds", "losses")}),
          flush=True)

    data = output_dir / "data"
    for category in args.categories:  # (written where missing or written with other settings)
        load_synthetic_dataset(data, category, num_train=args.num_train, num_test_good=args.num_test_good,
                               num_test_per_defect=args.num_test_per_defect, image_size=args.image_size, seed=0)

    # One protocol folder per fine-tune recipe (maeday-evaluate resumes a folder only with its own settings).
    recipe = (args.finetune_steps, args.finetune_learning_rate)
    protocol = output_dir / ("protocol" if recipe == (50, 1e-2) else f"protocol-steps{recipe[0]}-lr{recipe[1]:g}")
    status = evaluate.main([
        "--model", str(model), "--dataset", f"synthetic:{data}", "--categories", *args.categories,
        "--output-dir", str(protocol), "--shots", *map(str, args.shots),
        "--shot-seeds", str(args.shot_seeds), "--num-masks", str(args.num_masks), "--repetitions", "--no-plots",
        "--finetune-steps", str(args.finetune_steps), "--finetune-learning-rate", str(args.finetune_learning_rate),
        "--quiet",
    ])
    if status == 0:
        print((protocol / "tables.md").read_text())
    return status


if __name__ == "__main__":
    sys.exit(main())
