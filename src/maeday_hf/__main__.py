"""`python -m maeday_hf ...` is the `maeday` command (also under `accelerate launch -m maeday_hf finetune ...`)."""

import sys

from .cli import program

if __name__ == "__main__":
    sys.exit(program())
