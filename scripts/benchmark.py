#!/usr/bin/env python
"""Speed of MAEDAY inference: the paper's procedure (baseline, written plainly here) vs the package's pipeline.

Both run in this process on the same random-weight model and the same decoded images, end to end from PIL images to
anomaly maps. Prints one JSON object per line: per method ms/image, images/s, achieved TFLOP/s (analytic FLOPs of the
N masked forwards, `maeday_hf.flops`), peak memory; then the ratio baseline / package.

    python scripts/benchmark.py --geometries base --device cpu --num-images 4
    python scripts/benchmark.py --geometries base large huge --device cuda --num-images 256

The baseline is the paper's: fp32, one image x N masks per forward, error filtered per channel and per mask.
`maeday_hf` is the public pipeline call with its defaults (end to end, from decoded PIL images to maps at their
original size); `maeday_hf_scoring_only` is its scoring function on images already processed and on the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

import maeday_hf
from maeday_hf.flops import image_flops
from maeday_hf.masking import make_mask_noise
from maeday_hf.modeling import load_detector
from maeday_hf.pipeline import default_gpu_batch_size
from maeday_hf.reconstruction import bfloat16_copy, count_patches, runs_in_bfloat16_by_default
from maeday_hf.scoring import maeday_anomaly_maps

GEOMETRIES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=16),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14),
}


def paper_procedure(model, processor, images, num_masks, mask_ratio, device):
    """The paper's zero-shot MAEDAY, as plainly as possible: per image, one forward of N masked copies."""
    taps = torch.exp(-((torch.arange(7, dtype=torch.float32) - 3) ** 2) / (2 * 1.4**2))
    kernel = (torch.outer(taps, taps) / torch.outer(taps, taps).sum()).to(device)[None, None]
    model.config.mask_ratio = mask_ratio
    anomaly_maps = []
    for image in images:
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].to(device)
        batch = pixel_values.expand(num_masks, -1, -1, -1)
        with torch.no_grad():
            logits = model(pixel_values=batch).logits  # the model draws its own random masks
            reconstructions = model.unpatchify(logits)
            squared_error = (batch - reconstructions) ** 2  # (N, 3, H, W)
            filtered = torch.cat(
                [F.conv2d(F.pad(squared_error[:, c : c + 1], (3, 3, 3, 3), mode="reflect"), kernel) for c in range(3)],
                dim=1,
            )
            anomaly_maps.append(filtered.sum(dim=1).mean(dim=0))
    # Copied to the host once at the end, not per image: a sync per image would keep the CPU from preparing the next
    # image while the GPU works on this one, and slow the baseline down for no reason of the method's.
    anomaly_maps = torch.stack(anomaly_maps).cpu()
    return anomaly_maps, anomaly_maps.amax(dim=(1, 2))


def timed(function, device, repeats, warm_up=True):
    """Median wall time of `repeats` calls (after one warm-up call, unless `warm_up=False`), with device
    synchronisation."""
    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_with_memory(function, device, repeats, models):
    """`(seconds, memory)`: `timed`'s median, and on a GPU the method's own peak memory in MB: the weights of `models`
    (the modules it runs: their parameters and buffers) plus the most it allocated above what was allocated before
    it ran (everything else resident then, such as another method's model, is left out). On a CPU, the process's
    peak resident memory so far (it only rises within a process: a figure for the process, not for the method)."""
    function()  # warm-up: state built on first use (the bf16 copy, cached masks, kernels) is counted in its models
    if device.type != "cuda":
        seconds = timed(function, device, repeats, warm_up=False)
        return seconds, {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(function, device, repeats, warm_up=False)
    working = torch.cuda.max_memory_allocated(device) - resident
    weights = sum(tensor.numel() * tensor.element_size() for model in models
                  for tensor in (*model.parameters(), *model.buffers()) if tensor.device.type == "cuda")
    return seconds, {"peak_memory_mb": round((weights + working) / 2**20, 1),
                     "weights_mb": round(weights / 2**20, 1), "working_memory_mb": round(working / 2**20, 1)}


def benchmark_geometry(name, args, device):
    config = ViTMAEConfig(**GEOMETRIES[name], image_size=224)
    with tempfile.TemporaryDirectory(prefix=f"maeday-bench-{name}-") as folder:  # (ViT-H's is 2.6 GB)
        _benchmark_geometry(name, config, folder, args, device)


def _benchmark_geometry(name, config, folder, args, device):
    torch.manual_seed(0)
    ViTMAEForPreTraining(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    rng = np.random.default_rng(0)
    size = (args.image_size, args.image_size, 3)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(args.num_images)]
    # The work each path does: the paper's procedure embeds the patches in every forward, the package once per image.
    flops_per_image = {
        method: image_flops(config, args.num_masks, args.mask_ratio, embed_once=method != "paper_baseline")
        for method in ("paper_baseline", "maeday_hf", "maeday_hf_scoring_only")
    }
    common = dict(geometry=name, device=str(device), num_masks=args.num_masks, mask_schedule=args.mask_schedule,
                  num_images=args.num_images, input_size=args.image_size)

    detector = load_detector(folder, device=device)
    # The PIL processor, or the torchvision one where torchvision is installed (its resize has no shortcut).
    common["image_processor"] = type(detector.image_processor).__name__
    baseline_model = ViTMAEForPreTraining.from_pretrained(folder).to(device).eval()
    results = {}
    # The package's public call, with its defaults unless the command line overrides them.
    call = dict(num_masks=args.num_masks, mask_ratio=args.mask_ratio, mask_schedule=args.mask_schedule)
    call.update({key: value for key, value in dict(
        batch_size=args.batch_size, mask_batch_size=args.mask_batch_size, num_workers=args.num_workers
    ).items() if value is not None})
    # The scoring path alone, on images already processed and on the device: what the pipeline would reach if
    # decoding, resizing and copying cost nothing.
    pixel_values = detector.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    noise = make_mask_noise(
        args.num_masks, count_patches(detector.model, pixel_values), args.mask_ratio, args.mask_schedule
    ).to(device)  # on the device once, as the pipeline keeps it (a copy per batch would wait for the GPU)
    scoring_batch = call.get("batch_size") or (default_gpu_batch_size(args.num_masks) if device.type == "cuda" else 1)

    def scoring_path():
        for batch in pixel_values.split(scoring_batch):
            maeday_anomaly_maps(detector.model, batch, noise, args.mask_ratio, mask_batch_size=args.mask_batch_size)

    runs = {
        "paper_baseline": lambda: paper_procedure(
            baseline_model, detector.image_processor, images, args.num_masks, args.mask_ratio, device
        ),
        "maeday_hf": lambda: detector(images, **call),
        "maeday_hf_scoring_only": scoring_path,
    }
    if args.compare_precision:
        # The pipeline in float32 too: the ratio to the baseline without bf16's share.
        runs["maeday_hf_fp32"] = lambda: detector(images, bf16=False, **call)
        flops_per_image["maeday_hf_fp32"] = flops_per_image["maeday_hf"]
    # The bf16 copy the package runs its forwards in (cached with the model; a bf16 model runs as it is).
    bf16_copy = ([bfloat16_copy(detector.model)] if detector.model.dtype == torch.float32
                 and runs_in_bfloat16_by_default(detector.model, device) else [])
    models_of = {"paper_baseline": [baseline_model], "maeday_hf_fp32": [detector.model]}
    # Preprocessing alone, per image, called from one Python thread (PIL works on one core): the paper baseline's
    # processor call against the pipeline's (which hands uint8 pixels to the device); on a GPU the pipeline runs it
    # in threads beside the model.
    on_cpu = torch.device("cpu")
    preprocessing = {
        "paper_baseline": timed(
            lambda: [detector.image_processor(images=image, return_tensors="pt") for image in images], on_cpu,
            args.repeats,
        ),
        "maeday_hf": timed(lambda: [detector.preprocess(image) for image in images], on_cpu, args.repeats),
    }
    print(json.dumps(common | dict(
        method="preprocessing_per_image_one_thread",
        **{f"{method}_ms_per_image": round(1000 * seconds / args.num_images, 3)
           for method, seconds in preprocessing.items()},
        baseline_over_maeday_hf=round(preprocessing["paper_baseline"] / preprocessing["maeday_hf"], 3),
    )), flush=True)
    for method, run in runs.items():
        seconds, memory = timed_with_memory(
            run, device, args.repeats, models_of.get(method, [detector.model, *bf16_copy])
        )
        results[method] = seconds
        print(json.dumps(common | dict(
            method=method,
            ms_per_image=round(1000 * seconds / args.num_images, 3),
            images_per_s=round(args.num_images / seconds, 3),
            achieved_tflops=round(flops_per_image[method] * args.num_images / seconds / 1e12, 3),
            gflop_per_image=round(flops_per_image[method] / 1e9, 1),
            **memory,
        )), flush=True)
    print(json.dumps(common | dict(
        method="ratio",
        baseline_over_maeday_hf=round(results["paper_baseline"] / results["maeday_hf"], 3),
        scoring_only_over_maeday_hf=round(results["maeday_hf_scoring_only"] / results["maeday_hf"], 3),
        **({"baseline_over_maeday_hf_fp32": round(results["paper_baseline"] / results["maeday_hf_fp32"], 3)}
           if "maeday_hf_fp32" in results else {}),
    )), flush=True)
    if args.compare_precision:
        exact = detector(images, bf16=False, **call)
        fast = detector(images, bf16=True, **call)
        map_differences = [
            float(np.abs(f["anomaly_map"] - e["anomaly_map"]).max() / np.abs(e["anomaly_map"]).max())
            for f, e in zip(fast, exact)
        ]
        score_differences = [abs(f["score"] - e["score"]) / abs(e["score"]) for f, e in zip(fast, exact)]
        print(json.dumps(common | dict(
            method="bf16_vs_fp32",
            max_map_difference_relative_to_map_max=round(max(map_differences), 6),
            max_score_difference_relative=round(max(score_differences), 6),
        )), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", choices=sorted(GEOMETRIES), default=["base"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--num-masks", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--mask-schedule", choices=("random", "balanced"), default="random",
                        help="the package paths' schedule (the paper baseline always draws its own random masks)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the decoded input images")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward in the package path (default: the pipeline's, 32 on a GPU, 1 on a CPU)")
    parser.add_argument("--mask-batch-size", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="preprocessing threads on a GPU / DataLoader workers on a CPU (default: the pipeline's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method, after a warm-up (>= 1)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="also report how far bf16-weight maps are from float32 maps")
    args = parser.parse_args(argv)
    for name in ("num_images", "num_masks", "repeats", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(json.dumps(dict(
        method="environment", python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, maeday_hf=maeday_hf.__version__, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(),
    )), flush=True)
    for name in args.geometries:
        benchmark_geometry(name, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
