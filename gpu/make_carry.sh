#!/usr/bin/env bash
# Gathers into carry/ every wheel the GPU machine needs beyond what it has preinstalled
# (Python 3.12, torch, Triton, transformers 5.17; no network, no Rust): the kvmix abi3 wheel,
# transformers 5.23 with the deps the preinstalled 5.17 lacks (huggingface_hub 2 imports httpx2), and optimum-quanto (the QuantizedCache baseline).
# carry/ travels with `run --carry carry` (64 MiB limit, checked at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf carry && mkdir -p carry
.venv/bin/maturin build --release --features python --out carry --quiet
"$PY" -m pip download --quiet --dest carry --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  --no-deps "transformers==5.23.*" "optimum-quanto" "huggingface-hub>=1.0" "tokenizers" \
  "safetensors" "ninja" "httpx2" "httpcore2" "truststore" "h11" "anyio" "idna" "hf-xet"
ls -la carry
size=$(du -sm carry | cut -f1)
echo "carry/: ${size} MiB"
if [ "$size" -ge 64 ]; then echo "carry/ is over the 64 MiB carry limit" >&2; exit 1; fi
