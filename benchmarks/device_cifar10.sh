#!/usr/bin/env bash
# The GPU protocol of the CIFAR-10 ResNet-20 benchmark, for a lent device machine (no network there):
# install the carried wheels (.whl: torchao, datasets and what datasets needs beyond the device image),
# read the carried parquet copy of CIFAR-10 (.carry/cifar10, 55 MB), train the FP start for
# $FP_EPOCHS epochs, then run several methods IN PARALLEL on the one GPU (ResNet-20 uses a sliver of
# it), $QAT_EPOCHS epochs each, inside a wall-clock budget. Results go to $OUT/cifar10_resnet20_gpu.json
# (copy to benchmarks/results/ afterwards); every run is resumable, so a second call continues.
# Not yet run on a GPU (no device was lent when it was written): sizes are estimates.
#   run: bash benchmarks/device_cifar10.sh   (carry: .whl .carry)
set -u
budget=${BUDGET_S:-540}
start=$(date +%s)
left() { local l=$((budget - ($(date +%s) - start))); echo $((l > 1 ? l : 1)); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MEC_QUANT_CIFAR10=$PWD/.carry/cifar10 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MEC_QUANT_BENCH_DIR=/tmp/bench-cifar10 MEC_QUANT_CACHE=/tmp/cache
out=${OUT:-outputs}/cifar10_resnet20_gpu.json
nvidia-smi -L
python3 -c "import torch, torchao, datasets; print(torch.__version__, torchao.__version__, datasets.__version__)"
timeout "$(left)" python3 benchmarks/cifar10.py fp-start --epochs "${FP_EPOCHS:-40}" || exit 1
common=(run --bits W2A2 --seeds 0 --qat-epochs "${QAT_EPOCHS:-8}" --out "$out" --checkpoint-every 390)
for methods in "fp ptq plain" "kd:distill_temperature=4" "mec" "mec:mec_weight=0,mec_mi_weight=20" "mec:mec_weight=0,mec_mi_weight=20,distill_weight=1,distill_temperature=4"; do
  # shellcheck disable=SC2086
  timeout "$(left)" python3 benchmarks/cifar10.py "${common[@]}" --methods $methods > "/tmp/run-${methods// /_}.log" 2>&1 &
done
wait
cat /tmp/run-*.log | grep -E "seed [0-9]+:" || true
cp "$MEC_QUANT_BENCH_DIR/fp-start.json" "${OUT:-outputs}/cifar10_fp_start_gpu.json" 2>/dev/null || true
