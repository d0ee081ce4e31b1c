r"""The paper's protocol (Sec. 4): Tables 1/2 (or 3 for FOD) and Figs. 2/3 in one resumable command.

    maeday-evaluate --model facebook/vit-mae-base --dataset /data/mvtec_anomaly_detection \
        --shots 0 1 2 3 4 --shot-seeds 3 --num-masks 32 --ensemble patchcore --output-dir results
    accelerate launch --num_processes 4 -m maeday_hf.commands.evaluate ...   # units split across processes
    maeday-evaluate --model M --dataset synthetic:/tmp/synthetic --categories stripes disc \
        --shots 0 1 --repetitions 1 2 4 --output-dir results-synthetic

(`python scripts/evaluate.py ...` in a clone is the same program.)

--dataset: an extracted MVTec AD folder, a dataset repo folder (`maeday-publish-dataset --dry-run`), a Hub id ORG/NAME with
one config per category, `synthetic:DIR` or `fod:DIR`. Rerunning the same command continues where it stopped.
Outputs: RESULTS/{settings.json, results.json, tables.md, fig2_shots.png, fig3_repetitions.png, units/, adapters/}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from maeday_hf.cli import (
    BF16_OF_PRECISION,
    as_program,
    configure_logging,
    how_stopped,
    interrupted_status,
    terminate_as_interrupt,
)
from maeday_hf.ensemble import NORMALIZATION_METHODS
from maeday_hf.masking import MASK_SCHEDULES
from maeday_hf.protocol import PAPER_REPETITIONS, ProtocolConfig, execute_protocol, prepare_protocol
from maeday_hf.step_loop import GraphCaptureError

PROG = "maeday-evaluate"
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, GraphCaptureError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="ViTMAE checkpoint (Hub id or folder).")
    parser.add_argument("--dataset", required=True,
                        help="MVTec folder, repo folder, ORG/NAME, synthetic:DIR or fod:DIR.")
    parser.add_argument("--categories", "--config", nargs="+", help="Categories (configs); default: all of them.")
    parser.add_argument("--output-dir", required=True, help="RESULTS folder; rerunning into it resumes.")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1], help="k values (0 = zero-shot).")
    parser.add_argument("--shot-seeds", type=int, default=3, help="Shot selections per k > 0 (seeds 0..n-1).")
    parser.add_argument("--num-masks", type=int, default=32, help="Masked reconstructions per image (N).")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--mask-seed", type=int, default=0)
    parser.add_argument("--mask-schedule", choices=MASK_SCHEDULES, default="random")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per MAEDAY forward pass.")
    parser.add_argument("--repetitions", type=int, nargs="*", default=list(PAPER_REPETITIONS),
                        help="N values of Fig. 3 (zero-shot, both schedules); give none to skip Fig. 3.")
    parser.add_argument("--ensemble", choices=("patchcore",), help="Add PatchCore, 2xPatchCore and MAEDAY+PatchCore.")
    parser.add_argument("--ensemble-normalization", choices=NORMALIZATION_METHODS, default="zscore",
                        help="How each method of an ensemble is standardised over the test images before the sum "
                             "(label-free); 'none' sums the raw outputs, the paper's words taken literally.")
    parser.add_argument("--patchcore-backbone", help="PatchCore backbone (default: the PatchCore module's).")
    parser.add_argument("--patchcore-image-size", type=int, help="PatchCore input side (default: the backbone's).")
    parser.add_argument("--finetune-steps", type=int, help="Fine-tuning steps (default: the paper's 50).")
    parser.add_argument("--finetune-batch-size", type=int, help="Views per step (default: 32).")
    parser.add_argument("--finetune-learning-rate", type=float,
                        help="Default: 1e-2 (LoRA), 1e-4 with --full-finetune.")
    parser.add_argument("--trainer-loop", action="store_true",
                        help="On one GPU, fine-tune with the Trainer loop instead of CUDA graph replays (same steps).")
    parser.add_argument("--full-finetune", action="store_true",
                        help="Fine-tune every weight instead of LoRA (the paper's ablation, Table 5).")
    parser.add_argument("--lora-rank", type=int, help="Default: 32.")
    parser.add_argument("--no-pixel-metrics", dest="pixel_metrics", action="store_false",
                        help="Image metrics only (datasets without masks).")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="Skip the PNG figures.")
    parser.add_argument("--precision", choices=tuple(BF16_OF_PRECISION), default="auto",
                        help="Model precision for scoring and fine-tuning; auto: bf16 where the device multiplies it "
                             "in hardware (recorded with the settings).")
    parser.add_argument("--device", default="auto", help="'auto' (each process's accelerator), 'cpu', 'cuda:0', ...")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--verbose", action="store_true", help="Log every unit; errors with their traceback.")
    return parser


def config_from_args(args: argparse.Namespace) -> ProtocolConfig:
    from maeday_hf.finetune import FinetuneConfig

    recipe = {
        name: value
        for name, value in (
            ("num_steps", args.finetune_steps),
            ("batch_size", args.finetune_batch_size),
            ("learning_rate", args.finetune_learning_rate),
            ("lora_rank", args.lora_rank),
        )
        if value is not None
    }
    if args.full_finetune:
        recipe["full_finetune"] = True
    if args.trainer_loop:
        recipe["cuda_graph"] = False
    patchcore = None
    if not args.ensemble and (args.patchcore_backbone is not None or args.patchcore_image_size is not None):
        raise ValueError("--patchcore-backbone and --patchcore-image-size need --ensemble patchcore (without it no "
                         "PatchCore runs).")
    if args.ensemble:
        from maeday_hf.patchcore import PatchCoreConfig

        options = {"backbone": args.patchcore_backbone, "image_size": args.patchcore_image_size}
        patchcore = PatchCoreConfig(**{name: value for name, value in options.items() if value is not None})
    return ProtocolConfig(
        model=args.model,
        dataset=args.dataset,
        output_dir=args.output_dir,
        categories=args.categories,
        shots=args.shots,
        num_shot_seeds=args.shot_seeds,
        num_masks=args.num_masks,
        mask_ratio=args.mask_ratio,
        mask_seed=args.mask_seed,
        mask_schedule=args.mask_schedule,
        batch_size=args.batch_size,
        repetitions=args.repetitions,
        ensemble=args.ensemble,
        ensemble_normalization=args.ensemble_normalization,
        patchcore=patchcore,
        finetune=FinetuneConfig(**recipe),
        pixel_metrics=args.pixel_metrics,
        plots=args.plots,
        bf16=BF16_OF_PRECISION[args.precision],
        device=args.device,
        show_progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        logging.INFO if args.verbose else logging.WARNING, "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.quiet:
        import datasets
        from transformers.utils import logging as transformers_logging

        datasets.disable_progress_bars()
        transformers_logging.disable_progress_bar()
    try:
        with terminate_as_interrupt():
            prepared = prepare_protocol(config_from_args(args))
            results = execute_protocol(prepared)
    except USER_ERRORS as error:  # bad input, found before anything runs or by the step that meets it
        if args.verbose:
            raise  # the whole traceback, for a report
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"{PROG}: {how_stopped(error)}; rerun the same command to continue.", file=sys.stderr)
        return interrupted_status(error)
    if results is not None:
        print(results)
    return 0


program = as_program(main)
"""The `maeday-evaluate` command."""

if __name__ == "__main__":
    sys.exit(program())
