#!/usr/bin/env python
"""Publish a dataset with one config per category: `maeday-publish-dataset`, run from a clone. See
`maeday_hf.commands.publish_dataset` for the options."""

from __future__ import annotations

import sys

from maeday_hf.commands.publish_dataset import build_parser, main, program  # noqa: F401 - the program, re-exported

if __name__ == "__main__":
    sys.exit(program())
