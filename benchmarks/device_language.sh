#!/usr/bin/env bash
# The GPU run of the language classification benchmark, as run on the lent device machine (no network
# there): install the carried wheels (.whl: torchao, datasets, dill, multiprocess, rdata), read the
# carried data and model (.carry/janeaustenr, .carry/minilm = all-MiniLM-L6-v2 stored in fp16 to fit
# the 64 MiB transfer, loaded as fp32), run W2A2 then W4A4 inside a wall-clock budget. Results go to
# $OUT/classify.json (copied to benchmarks/results/ afterwards).
set -u
budget=${BUDGET_S:-540}
start=$(date +%s)
left() { local l=$((budget - ($(date +%s) - start))); echo $((l > 1 ? l : 1)); }  # timeout 0 would mean none
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MEC_QUANT_AUSTEN_DIR=$PWD/.carry/janeaustenr PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
out=${OUT:-outputs}/classify.json
nvidia-smi -L
python3 -c "import torch, transformers, torchao, datasets; print(torch.__version__, transformers.__version__, torchao.__version__, datasets.__version__)"
run() { timeout "$(left)" python3 benchmarks/language.py classify --model .carry/minilm --out "$out" --work-dir /tmp/w "$@" 2>&1 | grep -v "Warning\|warn(" ; }
run --bits W2A2 --seeds 0 1 2 --methods fp ptq plain mec torchao
run --bits W4A4 --seeds 0 1 2 --methods ptq plain mec torchao
cp /tmp/w/fp/config.json "${OUT:-outputs}/fp_config.json" 2>/dev/null || true
