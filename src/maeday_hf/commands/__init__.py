"""Command-line programs besides `maeday` itself, installed as `maeday-evaluate` and `maeday-publish-dataset` (and
runnable as `python -m maeday_hf.commands.evaluate`, also under `accelerate launch -m ...`); `scripts/` holds thin
wrappers of them for a clone."""
