#!/usr/bin/env bash
# Every GPU check of issue #18 that this project can run, in one command, for a GPU that is lent for
# minutes (this workplace's device tool: one H200, 15 minutes a session, 10 minutes a call).
#
#   benchmarks/gpu_checks.sh wheels   here: Python 3.12 wheels of what the lent GPU machine's image lacks
#                                     (open_clip, bentoml and their needs, ~10 MB) into .whl/
#   benchmarks/gpu_checks.sh run      there: the checks below, each bounded by `timeout`, files into $OUT
#
# The device call:  command "bash benchmarks/gpu_checks.sh run", carry [".whl"], timeout_s 600.
# On a CUDA machine with the project installed (`make install`), `run` needs no wheels.
#
# Each part is stopped with SIGINT at its timeout (Python's cleanup runs: a benchmark's server is stopped), killed 10 s later.
# What `run` does (under 10 minutes: its parts' timeouts add to 530 s, 580 with their 10 s grace; ~2.5 minutes on 2 CPU cores, where
# the GPU parts skip):
#   1. capt info (the machine and what auto means on it)          -> the log
#   2. python -m benchmarks.gpu: ViT-B-32 at batch 1/64/256, ONNX Runtime CUDA fp32/fp16 and TensorRT
#      (rows that say why where onnxruntime-gpu or TensorRT's libraries are missing) vs PyTorch CUDA
#      fp32 and fp16 autocast                                      -> $OUT/gpu.json, gpu.md
#   3. python -m benchmarks.photos: 1/4/12-megapixel JPEGs decoded and resized on the CPU against
#      torchvision.io.decode_jpeg on the GPU, and /classify end to end -> $OUT/photos.json, photos.md
#   4. CAPT_BENCH_DEVICE=cuda python -m benchmarks.precision: the CAPT training step on the GPU in
#      fp32, bf16 and auto (auto's timing on CUDA)                 -> $OUT/precision.json, precision.md
#   5. the tests of the machine description, the precision choice and the engines, on CUDA -> the log
# and a log of it all                                               -> $OUT/log.txt
# (at most 8 files come back from a device call: these are 7).
#
# Not covered, because the lent machine's image cannot hold it within a call's 64 MiB (the tracked
# tree is ~36 MB): onnxruntime-gpu (its 1.31.1 wheel for Python 3.12 is 255 MB), without which the
# ONNX Runtime CUDA and TensorRT rows only say that they could not run; TensorRT's libraries.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the lent H200's image already holds (the device tool's KINDS.md, read 2026-11-17): not fetched.
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
build certifi charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler cython
filelock flatbuffers fonttools frozenlist fsspec h11 h5py hf-xet httpcore httpx huggingface-hub
hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lazy-loader markdown markdown-it-py
markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy nvidia-ml-py onnx
onnx-ir onnxruntime onnxscript packaging pandas pathspec pillow pip pluggy prometheus-client
propcache protobuf psutil pygments pyparsing pytest pytest-timeout pytest-xdist python-dateutil
pyyaml regex requests rich safetensors scikit-image scikit-learn scipy setuptools six sympy timm
tokenizers torch torchvision tqdm typing-extensions typing-inspect urllib3 uvloop werkzeug wheel
wrapt yarl zipp"
PLATFORMS="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_26_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
--platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64"

wheels() {
    local dir=.whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude  # never committed
    rm -rf "$dir" && mkdir -p "$dir"
    local pip=(python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12
               --implementation cp $PLATFORMS --platform any -d "$dir")
    # bentoml and httptools with their needs; open_clip without them (they are torch, torchvision, timm...,
    # which the image has: resolving them would fetch CUDA wheels of several GB).
    "${pip[@]}" "bentoml==$(pinned bentoml)" "httptools==$(pinned httptools)" || return 1
    "${pip[@]}" --no-deps "open_clip_torch==$(pinned open_clip_torch)" ftfy wcwidth || return 1
    local wheel name
    for wheel in "$dir"/*.whl; do
        name=$(basename "$wheel" | sed 's/-[0-9].*//' | tr '_A-Z' '-a-z')
        if [[ " $(echo $IMAGE_HAS) " == *" $name "* ]]; then rm "$wheel"; fi
    done
    local tree_bytes wheel_bytes
    tree_bytes=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    wheel_bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
    echo "$(ls "$dir" | wc -l) wheels, $((wheel_bytes / 1048576)) MiB, in $dir; with the tracked tree" \
         "($((tree_bytes / 1048576)) MiB) a call carries $(((tree_bytes + wheel_bytes) / 1048576)) MiB of its 64"
}

pinned() {  # the version requirements.txt pins for package $1
    sed -n "s/^$1==\([^ ;]*\).*/\1/p" requirements.txt
}

run() {
    local out=${OUT:-/tmp/gpu-checks}
    mkdir -p "$out"
    exec > >(tee "$out/log.txt") 2>&1
    local tee_pid=$!
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    local python=python3
    if [[ -x .venv/bin/python ]]; then
        python=.venv/bin/python
    elif compgen -G ".whl/*.whl" > /dev/null; then
        "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed"; return 1; }
        export PYTHONPATH=/tmp/site:$PWD
    fi
    echo "== $(date -u +%FT%TZ) python: $("$python" -V 2>&1); $(nvidia-smi --query-gpu=name,driver_version,memory.total \
         --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    step 20 "$python" -m capt.cli info
    bench 200 gpu
    bench 130 photos
    bench 90 precision CAPT_BENCH_DEVICE=cuda
    step 90 "$python" -m pytest -q -p no:cacheprovider tests/test_hardware.py tests/test_precision_option.py \
        tests/test_engine.py
    echo "== $(date -u +%FT%TZ) done; files: $(ls "$out" | tr '\n' ' ')"
    exec >&- 2>&-
    wait "$tee_pid"  # the log's last lines are in the file before the call collects $out
}

bench() {  # bench SECONDS NAME [VAR=VALUE...]: python -m benchmarks.NAME into $out/NAME.json and .md; its table (stderr) logged
    local seconds=$1 name=$2 started=$SECONDS status
    shift 2
    echo "== $(date -u +%T) $* benchmarks.$name"
    env "$@" timeout -s INT -k 10 "$seconds" "$python" -m "benchmarks.$name" --output "$out/$name.json" > /dev/null
    status=$?
    echo "== exit $status after $((SECONDS - started)) s$([[ $status == 124 || $status == 137 ]] && echo " (past its $seconds s)")"
}

step() {  # step SECONDS COMMAND...: one check, bounded, its status logged; a failure does not stop the rest
    local seconds=$1 started=$SECONDS status
    shift
    echo "== $(date -u +%T) $*"
    timeout -s INT -k 10 "$seconds" "$@"; status=$?
    echo "== exit $status after $((SECONDS - started)) s$([[ $status == 124 || $status == 137 ]] && echo " (past its $seconds s)")"
}

case "${1:-}" in
    wheels) wheels ;;
    run) run ;;
    *) echo "usage: $0 wheels|run (see the top of this file)" >&2; exit 2 ;;
esac
