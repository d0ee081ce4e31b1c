#!/usr/bin/env bash
# The one prepared GPU run, for a session that is lent a GPU machine (it has torch + CUDA, an older transformers, and
# no network). Prepare here, once, the wheels it lacks (the versions of constraints.txt; the machine's own
# huggingface_hub, safetensors, tokenizers and accelerate already fit):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 peft==0.21.2
#
# then run it there with `carry: [".whl"]`:  bash scripts/device_check.sh
# It writes JSON lines under $OUT (or results/device): the GPU tests, the inference speed table of the README (ViT-B
# on 256 px and 1024 px inputs, ViT-L, ViT-H, and ViT-B with 4 balanced masks; with the bf16-vs-fp32 map difference),
# and the 50-step fine-tune time with CUDA graph replays (the first 3 or 1 steps eager), with the Trainer loop, and with
# the views cut at the model's size. About 5 minutes on an H200.
set -uo pipefail  # no -e: one failing step must not keep the later ones from reporting
out=${OUT:-results/device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_check: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site
fi
# (Checked after the install too: a run against the machine's own older transformers would waste the whole lease.)
if ! python3 -c "import sys, transformers, peft; from packaging.version import Version as V; \
        sys.exit(not (V(transformers.__version__) >= V('5.24') and V('0.21') <= V(peft.__version__) < V('0.22')))"; then
    echo "device_check: transformers >= 5.24 and peft 0.21 are needed: carry the wheels ([\".whl\"], see above)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# The whole log in the file (tracebacks included), its end on screen.
# Every step has its own time limit (150 s, or what is left of 585 s, the whole run's budget): one that hangs must not
# take the lease's remaining minutes with it, and the run ends within one 10-minute command with its results out.
run() {
    local left=$(( 585 - SECONDS ))
    if (( left < 30 )); then echo "SKIPPED (no time left): $*" >&2; return 124; fi
    timeout $(( left < 150 ? left : 150 )) "$@"
    local status=$?
    (( status == 0 )) || echo "FAILED rc=$status: $*" >&2
    return $status
}
run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: rc=$?"; tail -15 "$out/gpu_tests.txt"
# JSON lines on stdout; each command's errors, and its exit status if it failed, in benchmark_stderr.txt.
{
    run python3 scripts/benchmark.py --device cuda --geometries base --num-images 256 --repeats 3 --compare-precision
    run python3 scripts/benchmark.py --device cuda --geometries base --num-images 128 --repeats 3 --image-size 1024
    run python3 scripts/benchmark.py --device cuda --geometries large huge --num-images 64 --repeats 2
    # The balanced schedule's 4 masks (README "Fewer masks"), 256 images per forward to keep 1,024 pairs per forward.
    run python3 scripts/benchmark.py --device cuda --geometries base --num-images 256 --repeats 3 --num-masks 4 \
        --mask-schedule balanced --batch-size 256
} 2> "$out/benchmark_stderr.txt" | grep --line-buffered '^{' | tee "$out/benchmark.jsonl"
grep -E "FAILED|SKIPPED" "$out/benchmark_stderr.txt"
{
    # The graph loop against the Trainer loop in one process, alternating (ratio on the last line):
    run python3 scripts/benchmark_finetune.py --device cuda --steps 50 --precision bf16 --runs 3 --compare-trainer-loop
    run python3 scripts/benchmark_finetune.py --device cuda --steps 50 --precision bf16 --runs 2 --graph-warmup-steps 1
    # Views cut from the 1024 px shots at the model's size (the rendering before 2026-11-29), for its cost:
    run python3 scripts/benchmark_finetune.py --device cuda --steps 50 --precision bf16 --runs 2 --view-supersampling 1
} 2> "$out/finetune_stderr.txt" | grep --line-buffered '^{' | tee "$out/finetune.jsonl"
grep -E "FAILED|SKIPPED" "$out/finetune_stderr.txt"
# The graph loop's own split of its time (its first, eager steps + the capture, then the replays):
grep 'eager steps' "$out/finetune_stderr.txt" | tee "$out/finetune_split.txt"
exit 0
