"""Publish MVTec AD, the FOD set or the synthetic set as a Hub dataset with one config per category.

    maeday-publish-dataset mvtec --root /data/mvtec_anomaly_detection --repo-id ORG/mvtec-ad
    maeday-publish-dataset fod --root /data/fod --dry-run out/fod        # writes the repo folder locally
    maeday-publish-dataset synthetic --root /tmp/synthetic --dry-run out/synthetic --categories stripes

The dry-run folder loads back with `maeday_hf.data.load_hub_folder("out/fod", "indoor")` (from its Parquet files;
`datasets.load_dataset("out/fod", "indoor")` caches a local folder by its name, and may return rows of before a rewrite).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from maeday_hf.cli import (
    as_program,
    configure_logging,
    how_stopped,
    interrupted_status,
    terminate_as_interrupt,
)
from maeday_hf.data import push_configs_to_hub, write_hub_folder
from maeday_hf.data.publish import BUILDERS, DEFAULT_LICENSES, check_hub_folder, load_configs

PROG = "maeday-publish-dataset"
USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(BUILDERS), help="Which builder reads --root.")
    parser.add_argument("--root", required=True, help="Extracted dataset folder (for synthetic: where to write it).")
    parser.add_argument("--categories", nargs="+", help="Configs to publish (default: all found under --root).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub dataset repo, e.g. ORG/mvtec-ad.")
    target.add_argument("--dry-run", metavar="DIR", help="Write the repo folder to DIR instead of pushing.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--license", help="Hub licence id the dataset card names, unless it names one already (default: "
        + ", ".join(f"{name}: {value}" for name, value in DEFAULT_LICENSES.items()) + "; none for the others)."
    )
    return parser


def _check_apart(dry_run: str, root: str) -> None:
    """The repo folder and the dataset's own folder must not overlap: the dry run replaces the config folders it
    writes (a config is named like the category folder it comes from) and the README.md."""
    written, source = Path(os.path.realpath(dry_run)), Path(os.path.realpath(root))
    if written.is_relative_to(source) or source.is_relative_to(written):
        raise ValueError(
            f"--dry-run {dry_run!r} and --root {root!r} overlap; the dry run writes a config folder per category and a "
            f"README.md, which would replace the dataset's own: give it a folder of its own."
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with terminate_as_interrupt():
            if args.dry_run:
                check_hub_folder(args.dry_run)  # before the configs are loaded (the synthetic set is written then)
                _check_apart(args.dry_run, args.root)
            configs = load_configs(args.dataset, args.root, args.categories)
            license = args.license if args.license is not None else DEFAULT_LICENSES.get(args.dataset)
            if args.dry_run:
                write_hub_folder(configs, args.dry_run, license=license)
            else:
                push_configs_to_hub(configs, args.repo_id, private=args.private or None, license=license)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"{PROG}: {how_stopped(error)}", file=sys.stderr)
        return interrupted_status(error)
    return 0


program = as_program(main)
"""The `maeday-publish-dataset` command."""

if __name__ == "__main__":
    sys.exit(program())
