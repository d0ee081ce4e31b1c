#!/usr/bin/env python
"""The paper's protocol (Tables 1-3, Figs. 2-3): `maeday-evaluate`, run from a clone. See
`maeday_hf.commands.evaluate` for the options; `accelerate launch --num_processes 4 scripts/evaluate.py ...` splits
the units across processes."""

from __future__ import annotations

import sys

from maeday_hf.commands.evaluate import build_parser, config_from_args, main, program  # noqa: F401 - the program, re-exported

if __name__ == "__main__":
    sys.exit(program())
