#!/usr/bin/env python
"""Balanced vs random masks at N = 4..32 on the synthetic set (see `maeday_hf.schedule_study`), as JSON lines.

No pretrained weights are reachable offline, so a small ViTMAE is first pretrained on synthetic normal images the way
MAE is (its own masked-patch loss, AdamW, through `transformers.Trainer`), then every test image is scored under each
schedule, N and seed. A model must use the visible patches to be a fair test: one that predicts each masked patch from
its position alone makes every balanced schedule give the same map.

    python scripts/study_mask_schedule.py                      # about 8-10 min on 2 CPU cores
    python scripts/study_mask_schedule.py --steps 100 --num-test 10 --seeds 0 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from transformers import AutoImageProcessor, ViTMAEForPreTraining

from maeday_hf.schedule_study import compare_mask_schedules, summarize
from maeday_hf.small_mae import PATCH_SIZE, pretrain_small_mae
from maeday_hf.synthetic import CATEGORIES, DEFECT_TYPES, MIN_IMAGE_SIZE, make_sample


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size < MIN_IMAGE_SIZE or args.image_size % PATCH_SIZE:
        parser.error(f"--image-size must be a multiple of {PATCH_SIZE} (the patch size) >= {MIN_IMAGE_SIZE}, got "
                     f"{args.image_size}")
    for name, value, least in (("--num-train", args.num_train, 1), ("--steps", args.steps, 1),
                               ("--reference-num-masks", args.reference_num_masks, 1),
                               ("--num-test", args.num_test, 2)):  # (2: a good and a defective image)
        if value < least:
            parser.error(f"{name} must be >= {least}, got {value}")
    for name, values in (("--num-masks", args.num_masks), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            parser.error(f"{name} repeats a value ({' '.join(map(str, values))}): each once")
    if min(args.num_masks) < 1:
        parser.error(f"--num-masks must be >= 1, got {min(args.num_masks)}")
    if not all(0 <= seed < 2**32 for seed in args.seeds):
        parser.error(f"--seeds must be in [0, 2**32), got {' '.join(map(str, args.seeds))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=200, help="normal training images per category")
    parser.add_argument("--num-test", type=int, default=12, help="test images per category (half defective)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-masks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--reference-num-masks", type=int, default=512)
    args = parser.parse_args(argv)
    _check_arguments(parser, args)  # before the pretraining's minutes, not after
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as work:
        base = os.path.join(work, "small-mae")
        record = pretrain_small_mae(base, CATEGORIES, args.image_size, args.num_train, args.steps, args.learning_rate)
        print(json.dumps(record), flush=True)
        model = ViTMAEForPreTraining.from_pretrained(base).eval()
        processor = AutoImageProcessor.from_pretrained(base)

    images, masks, labels = [], [], []
    for category in CATEGORIES:
        for index in range(args.num_test):
            seed = 10_000 + index  # not a training image
            defect = DEFECT_TYPES[index % len(DEFECT_TYPES)] if index % 2 else None
            image, mask = make_sample(category, defect, args.image_size, seed)
            images.append(image)
            masks.append(np.zeros((args.image_size,) * 2, bool) if mask is None else np.asarray(mask) > 0)
            labels.append(int(defect is not None))
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    results = compare_mask_schedules(
        model, pixel_values, masks, labels, args.num_masks, args.seeds, args.reference_num_masks
    )
    for row in summarize(results):
        print(json.dumps({key: round(value, 5) if isinstance(value, float) else value for key, value in row.items()}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
