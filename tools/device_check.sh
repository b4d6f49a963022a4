#!/usr/bin/env bash
# One device-machine window (~10 min on an H100/H200): the hardware check of every Pallas kernel,
# then the GLA benchmark with fla side by side. Everything lands in OUTDIR (default $OUT):
#   gpu.txt                    the card, driver and clocks as found
#   hardware_check.json        one row per case, rewritten after each case (survives a timeout)
#   hardware_validation.json   the validation record (copy it over jaxblocks/kernels/)
#   hardware_check.md          the check's table (append it to BENCHMARKS.md)
#   bench_gla.md               benchmarks/gla.py's GPU section (pallas_gpu, xla, cuDNN, fla)
#   check.log, bench.log       full logs
# Wheels in .whl/ (fla-core, ml_collections, ...; see the device tool's README) are installed to
# /tmp/site first when present. Budgets in seconds: CHECK_S, CASE_S, BENCH_S. OPS (comma-separated,
# e.g. OPS=flashrnn) limits the check to those ops; OPS=none skips it (benchmark only). The tool's
# own timeout must exceed CHECK_S + BENCH_S + the wheel install (~30 s), or nothing comes back.
set -u
out=${1:-${OUT:?give OUTDIR or set OUT}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PWD:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
  --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, triton, torch; print('jax', jax.__version__, jax.devices(), \
'triton', triton.__version__, 'torch', torch.__version__)" | tee -a "$out/gpu.txt"
cp jaxblocks/kernels/hardware_validation.json "$out/hardware_validation.json"
if [ "${OPS:-all}" != none ]; then
  ops=(); [ "${OPS:-all}" != all ] && ops=(--ops "$OPS")
  timeout "${CHECK_S:-400}" python3 -m jaxblocks.kernels.check_hardware --timeout "${CASE_S:-100}" \
    "${ops[@]}" --record "$out/hardware_validation.json" --benchmarks "$out/hardware_check.md" \
    --json "$out/hardware_check.json" >"$out/check.log" 2>&1
  echo "check_hardware exit $?"
  pkill -f "check_hardware --worker" && sleep 2  # a case still running when the budget ran out
  tail -n 40 "$out/check.log"
fi
timeout "${BENCH_S:-160}" python3 -m benchmarks.run gla --quick --append "$out/bench_gla.md" \
  >"$out/bench.log" 2>&1
echo "benchmark exit $?"
tail -n 30 "$out/bench.log"
