"""Wall time of MAEDAY's few-shot fine-tuning (LoRA, the paper's recipe) for ViT-B/16 geometry, printed as JSON.

Random weights (`ViTMAEConfig()` defaults are ViT-B/16 at 224 px): the timing does not depend on the values.

    python scripts/benchmark_finetune.py --steps 5            # CPU: measure 5 steps, extrapolate to 50
    python scripts/benchmark_finetune.py --steps 50 --device cuda --runs 2        # CUDA graph replays (bf16 on Ampere+)
    python scripts/benchmark_finetune.py --steps 50 --device cuda --trainer-loop  # the Trainer loop
    python scripts/benchmark_finetune.py --steps 2 --precision fp32               # CPU, float32 (default: auto)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

from maeday_hf.cli import BF16_OF_PRECISION
from maeday_hf.finetune import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="steps measured (50 = the paper's run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-shots", type=int, default=1)
    parser.add_argument("--shot-size", type=int, default=1024,
                        help="side of the random shots in pixels (MVTec AD's are 700-1024): the views are cut from "
                             "them at up to --view-supersampling x 224 px (runs before 2026-11-29: 256 px shots, "
                             "views at the model's size; add --view-supersampling 1 to repeat them)")
    parser.add_argument("--view-supersampling", type=float, default=None,
                        help="FinetuneConfig.view_supersampling (default: the config's, 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=tuple(BF16_OF_PRECISION), default="auto",
                        help="auto: the package's default (bf16 where the device multiplies it in hardware)")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="--precision bf16")
    parser.add_argument("--full-finetune", action="store_true")
    parser.add_argument("--trainer-loop", action="store_true",
                        help="on a GPU, use the Trainer loop instead of CUDA graph replays (the baseline)")
    parser.add_argument("--graph-warmup-steps", type=int, default=3,
                        help="the run's first steps, run eagerly before the CUDA graph is captured "
                             "(FinetuneConfig.graph_warmup_steps)")
    parser.add_argument("--compare-trainer-loop", action="store_true",
                        help="on a GPU, also time the Trainer loop (the stock transformers path) in the same process, "
                             "alternating with the measured loop, and print their ratio")
    parser.add_argument("--runs", type=int, default=1,
                        help="fine-tunes in this process, one JSON line each: the first also pays the process's "
                             "one-time costs (CUDA's lazy kernel loading, library handles), later ones do not")
    args = parser.parse_args()
    if args.compare_trainer_loop and (args.device == "cpu" or args.trainer_loop):
        parser.error("--compare-trainer-loop compares the CUDA graph loop with the Trainer loop: it needs --device cuda "
                     "and not --trainer-loop (on a CPU both are the Trainer loop)")
    if args.runs < 1 or args.steps < 1 or args.shot_size < 1:
        parser.error(f"--runs, --steps and --shot-size must be >= 1, got {args.runs}, {args.steps} and "
                     f"{args.shot_size}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("maeday_hf.step_loop").setLevel(logging.INFO)  # where the graph loop's time goes (stderr)

    with tempfile.TemporaryDirectory() as work:
        base = os.path.join(work, "vit-mae-b16-random")
        torch.manual_seed(0)
        ViTMAEForPreTraining(ViTMAEConfig()).save_pretrained(base)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(base)
        rng = np.random.default_rng(0)
        shots = []
        for index in range(args.num_shots):
            path = os.path.join(work, f"shot_{index}.png")
            Image.fromarray((rng.random((args.shot_size, args.shot_size, 3)) * 255).astype(np.uint8)).save(path)
            shots.append(path)
        config = FinetuneConfig(
            num_steps=args.steps,
            batch_size=args.batch_size,
            full_finetune=args.full_finetune,
            use_cpu=args.device == "cpu",
            bf16=BF16_OF_PRECISION[args.precision],
            cuda_graph=not args.trainer_loop,
            graph_warmup_steps=args.graph_warmup_steps,
            disable_tqdm=True,
            logging_steps=max(1, args.steps),
            calibration_views_per_shot=1,
            calibration_num_masks=8,
            **({} if args.view_supersampling is None else {"view_supersampling": args.view_supersampling}),
        )
        baseline = dataclasses.replace(config, cuda_graph=False)
        runs = [(run, baseline if is_baseline else config) for run in range(1, args.runs + 1)
                for is_baseline in ((True, False) if args.compare_trainer_loop else (False,))]
        seconds = {"trainer": [], "measured": []}
        for run, run_config in runs:
            output_dir = os.path.join(work, f"out-{run}-{'trainer' if run_config is baseline else 'measured'}")
            start = time.perf_counter()
            result = finetune(base, shots, output_dir, run_config)
            total = time.perf_counter() - start
            seconds["trainer" if run_config is baseline else "measured"].append(result.train_seconds)
            with open(os.path.join(output_dir, "training_log.json")) as handle:
                training_log = json.load(handle)  # what ran, precision resolved
            print(json.dumps({
                "benchmark": "finetune",
                "run_in_process": run,
                "geometry": "ViT-B/16 224px (ViTMAEConfig defaults, random weights)",
                "method": "full" if args.full_finetune else "lora-r32",
                "loop": training_log["step_loop"],  # what ran
                **({"graph_warmup_steps": args.graph_warmup_steps} if training_log["step_loop"] == "cuda_graph" else {}),
                "precision": args.precision,
                "mixed_precision": training_log["mixed_precision"],
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
                "cpu_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "batch_size": args.batch_size,
                "num_shots": args.num_shots,
                "shot_size": args.shot_size,
                "view_supersampling": config.view_supersampling,
                "view_source_size": training_log.get("view_source_size"),  # (None: at the model's size)
                "steps_measured": args.steps,
                "train_seconds": round(result.train_seconds, 2),
                "first_and_last_logged_loss": [round(result.losses[0][1], 5), round(result.losses[-1][1], 5)],
                "seconds_per_step": round(result.train_seconds / args.steps, 3),
                "extrapolated_50_step_seconds": round(result.train_seconds / args.steps * 50, 1),
                "end_to_end_seconds_incl_load_calibrate_save": round(total, 2),
            }), flush=True)
        if args.compare_trainer_loop:
            # The first pair pays the process's one-time costs, on the Trainer's run (it goes first): left out of the
            # medians where there are later pairs.
            counted = slice(1, None) if args.runs >= 2 else slice(None)
            trainer, measured = (float(np.median(seconds[key][counted])) for key in ("trainer", "measured"))
            print(json.dumps({
                "benchmark": "finetune_ratio",
                "runs_each": args.runs,
                "runs_counted": len(seconds["trainer"][counted]),
                "trainer_loop_median_train_seconds": round(trainer, 2),
                "cuda_graph_median_train_seconds": round(measured, 2),
                "trainer_over_cuda_graph": round(trainer / measured, 2),
            }), flush=True)


if __name__ == "__main__":
    main()
