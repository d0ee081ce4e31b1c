#!/usr/bin/env bash
# The one prepared GPU run, for a session that is lent a GPU machine (it has torch + CUDA, an older transformers, and
# no network). Prepare here, once, the wheels it lacks (the versions of constraints.txt):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 peft==0.21.2 huggingface_hub==2.4.0 datasets==5.2.0 evaluate==0.4.6 \
#       accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.3
#
# then run it there with `carry: [".whl"]`:  bash scripts/device_check.sh
# It writes JSON lines under $OUT (or results/device): the speed table of the README, the bf16-vs-fp32 map
# difference, and the 50-step fine-tune time; plus the GPU-marked tests.
set -euo pipefail
out=${OUT:-results/device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee "$out/gpu_tests.txt"
python3 scripts/benchmark.py --device cuda --geometries base large huge --num-images 256 --batch-size 32 \
    --mask-batch-size 1024 --num-workers 8 --repeats 3 --compare-precision | tee "$out/benchmark.jsonl"
python3 scripts/benchmark_finetune.py --device cuda --steps 50 --bf16 | tee "$out/finetune.jsonl"
