#!/usr/bin/env python
"""Publish MVTec AD, the FOD set or the synthetic set as a Hub dataset with one config per category.

    python scripts/publish_dataset.py mvtec --root /data/mvtec_anomaly_detection --repo-id ORG/mvtec-ad
    python scripts/publish_dataset.py fod --root /data/fod --dry-run out/fod        # writes the repo folder locally
    python scripts/publish_dataset.py synthetic --root /tmp/synthetic --dry-run out/synthetic --categories stripes

The dry-run folder loads back with `datasets.load_dataset("out/fod", "indoor")`.
"""

from __future__ import annotations

import argparse
import logging

from maeday_hf.data import (
    FOD_CONFIGS,
    MVTEC_CATEGORIES,
    SYNTHETIC_CATEGORIES,
    load_fod,
    load_mvtec,
    load_synthetic_dataset,
    push_configs_to_hub,
    write_hub_folder,
)

LOADERS = {
    "mvtec": (load_mvtec, MVTEC_CATEGORIES),
    "fod": (load_fod, FOD_CONFIGS),
    "synthetic": (load_synthetic_dataset, SYNTHETIC_CATEGORIES),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(LOADERS), help="Which builder reads --root.")
    parser.add_argument("--root", required=True, help="Extracted dataset folder (for synthetic: where to write it).")
    parser.add_argument("--categories", nargs="+", help="Configs to publish (default: all of the dataset).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub dataset repo, e.g. ORG/mvtec-ad.")
    target.add_argument("--dry-run", metavar="DIR", help="Write the repo folder to DIR instead of pushing.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load, all_categories = LOADERS[args.dataset]
    configs = {name: load(args.root, name) for name in args.categories or all_categories}
    if args.dry_run:
        write_hub_folder(configs, args.dry_run)
    else:
        push_configs_to_hub(configs, args.repo_id, private=args.private or None)


if __name__ == "__main__":
    main()
