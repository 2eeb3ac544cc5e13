#!/usr/bin/env bash
# Issue 3's GPU measurements in one device-tool call (see README.md beside this file), most important
# first; each section has its own time limit and appends its result to $OUT, so a cut-off run still
# returns what it measured:
#   1. bench, bf16 and fp32, CUDA graph on        4. bench without CUDA graphs
#   2. timed 5-epoch `dvc repro`, bf16 + graph     5. 5-epoch accuracies over seeds 0-2 (accuracy.py)
#   3. pytest -m gpu
# Runs in a throwaway copy of the work tree: it edits params.yaml and makes a git repository there.
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
here=dev/gpu-check
t0=$(date +%s)
elapsed() { echo "[+$(($(date +%s) - t0)) s]"; }

# The image has torch; mlflow, dvc and the rest come as wheels (prepare.sh), the data from .gpu/mnist.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src MNIST_DATA_DIR=$PWD/.gpu/mnist
# dvc.yaml runs `python`; the image may only have python3.
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >/tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep "Model name"
python -c "import torch, mlflow, dvc; print('torch', torch.__version__, 'mlflow', mlflow.__version__)"
# Nothing outside the machine resolves: read the data from the local directory only.
sed -i 's/^    - http.*$//; s/^  mirrors:.*/  mirrors: []/; s/^  npm_package:.*/  npm_package: ""/' params.yaml
python -m mnist_cnn.download && python -m mnist_cnn.preprocess || exit 1
elapsed

bench() {
    echo "== bench ${*:2}"
    timeout "$1" python -m mnist_cnn.bench --device cuda --subset 60000 --workers 4 --repeats 2 "${@:2}" 2>&1 |
        tail -5 | tee -a "$OUT/bench.txt"
    elapsed
}
bench 80 --precision bf16
bench 80 --precision fp32

echo "== dvc repro (bf16 + cuda_graph, 5 epochs, from an empty data/)"
cp params.yaml /tmp/params.orig
rm -rf data/raw data/processed
git init -q 2>/dev/null
printf '/.gpu/\n/.whl/\n' >>.git/info/exclude
git add -A >/dev/null 2>&1 && git -c user.name=gpu-check -c user.email=gpu-check@localhost commit -qm snapshot
sed -i 's/precision: fp32 /precision: bf16 /; s/cuda_graph: false /cuda_graph: true  /' params.yaml
grep -n "precision:\|cuda_graph:" params.yaml
/usr/bin/time -f "dvc repro wall %e s" timeout 150 python -m dvc repro 2>&1 | grep -v "INFO mlflow\|^$" |
    tail -25 | tee "$OUT/repro.txt"
cat metrics/train.json
elapsed
cp /tmp/params.orig params.yaml

echo "== gpu tests"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py tests/test_distributed.py 2>&1 |
    tail -8 | tee "$OUT/gputests.txt"
elapsed
bench 60 --precision bf16 --no-cuda-graph
bench 60 --precision fp32 --no-cuda-graph

echo "== accuracy"
timeout 170 python "$here/accuracy.py" 2>&1 | tee "$OUT/accuracy.txt" | tail -12
elapsed
