#!/usr/bin/env bash
# The GPU check of issue 13 §1, for a lent device machine (no network there), one call under 10 minutes:
# training-step time of a MiniLM-sized BERT and a small Llama (SmolLM2-135M width, 8 layers), FP vs
# our QAT W2A2 vs torchao's QAT (int2 weights + int2 per-token activations), each eager and under
# torch.compile (inductor), timed round-robin (benchmarks/compile_steps.py). Targets: ours/FP <= 1.5
# compiled, ours faster than torchao. fp32 first, then bf16 autocast with what the budget leaves.
# Results: $OUT/compile_steps_gpu_fp32.json and $OUT/compile_steps_gpu_bf16.json (copy to
# benchmarks/results/ afterwards).
# Carry: .whl (the torchao wheel: `pip download torchao==0.18.0 --no-deps -d .whl` here first); the
# device image provides torch and transformers. Without torchao the torchao method is left out
# (our package imports torchao, so it must come from somewhere: the image or .whl).
# Not yet run on a GPU (none was lent when it was written): the sizes and the budget are estimates.
#   run: bash benchmarks/device_compile.sh   (carry: .whl; timeout_s 590)
set -u
budget=${BUDGET_S:-560}
start=$(date +%s)
left() { local l=$((budget - ($(date +%s) - start))); echo $((l > 1 ? l : 1)); }
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # the bf16 pass reuses nothing, but a rerun in the same lease does
nvidia-smi -L
python3 -c "import torch, transformers, torchao; print(torch.__version__, transformers.__version__, torchao.__version__)" || exit 1
out=${OUT:-outputs}
mkdir -p "$out"
# fp32: both models, all methods, eager and compiled (~5 min estimated: most of it inductor compilation).
timeout "$(left)" python3 benchmarks/compile_steps.py --models minilm llama --repeats 20 \
  --budget-s $(( $(left) - 150 )) --out "$out/compile_steps_gpu_fp32.json"
# bf16 autocast with what is left (each model's JSON is written as soon as it is done).
if [ "$(left)" -gt 120 ]; then
  timeout "$(left)" python3 benchmarks/compile_steps.py --models minilm llama --repeats 20 --autocast \
    --budget-s $(( $(left) - 60 )) --out "$out/compile_steps_gpu_bf16.json"
fi
echo "done in $(( $(date +%s) - start )) s"
