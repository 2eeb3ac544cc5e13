#!/usr/bin/env bash
# Builds what run.sh needs on the device machine, which can fetch nothing (both paths are git-ignored):
#   .whl/       Python 3.12 wheels of every pin in requirements.lock that the device image lacks
#               (image-packages.txt lists what it holds; ruff is not needed there)
#   .gpu/mnist/ the four MNIST files, gzipped (about 11 MB), from data/raw/ (run `make repro` first)
# Together they stay under the device tool's 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=dev/gpu-check
[ -f data/raw/train-images-idx3-ubyte ] || { echo "error: data/raw/ is empty: run \`make repro\` first" >&2; exit 1; }

normalise() { tr 'A-Z_.' 'a-z--'; }
skip=$( (grep -v '^#' "$here/image-packages.txt"; echo ruff) | normalise | sort -u)
pins=$(grep -v '^#' requirements.lock | while IFS= read -r pin; do
    grep -qx "$(echo "${pin%%==*}" | normalise)" <<<"$skip" || echo "$pin"
done)
# Pure-Python pins published only as source: built into a wheel here (any Python reads it).
source_only=$(grep -E '^antlr4-python3-runtime==' <<<"$pins")
binary=$(grep -vxF "$source_only" <<<"$pins")

rm -rf .whl.tmp && mkdir .whl.tmp
# shellcheck disable=SC2086 # one argument per pin
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl.tmp $binary
# shellcheck disable=SC2086
python3 -m pip wheel --quiet --no-deps -w .whl.tmp $source_only
rm -rf .whl && mv .whl.tmp .whl

mkdir -p .gpu/mnist
for f in data/raw/*-ubyte; do gzip -c "$f" > ".gpu/mnist/$(basename "$f").gz.tmp" && mv ".gpu/mnist/$(basename "$f").gz.tmp" ".gpu/mnist/$(basename "$f").gz"; done
echo "prepare: $(find .whl -name "*.whl" | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)), MNIST in .gpu/mnist/ ($(du -sh .gpu/mnist | cut -f1))"
