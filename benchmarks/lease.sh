#!/usr/bin/env bash
# One short GPU lease (docs/gpu.md): benchmarks/gpu.py, then the paper preset for the rest of the
# lease, stopped at an epoch or evaluation-shard boundary and packed for the next lease.
# Runs on the leased machine, from the repo root, with the folder `make gpu-lease` prepared
# (.gpu: the data pack, the torchattacks wheel, the commit, the last lease's carry) beside it.
#
#   OUT=/where/files/go/back bash benchmarks/lease.sh BENCH_SECONDS RUN_MINUTES
#
# BENCH_SECONDS 0 skips the benchmark, RUN_MINUTES 0 the run. With .gpu/ray.tar.xz (`lease.py
# prepare --ray`), the trimmed Ray runs between them: benchmarks/ray_gpu.py (a Train run's NCCL
# all-reduce), then jobs/pipeline.py --use-gpu on a reduced tiny run, into ray.log.
# What comes back under $OUT (at most 7 files): lease.log, gpu.json, ray.log, the run's carry
# (carry.json and <run>.tgz.NNN, 15.5 MiB each).
# For tests: KDP_LEASE (default .gpu), KDP_LEASE_RUNS (runs), KDP_LEASE_PRESET (paper),
# KDP_LEASE_DATA (the data pack in KDP_LEASE),
# KDP_LEASE_ARGS (more `kdp run` arguments), KDP_LEASE_BENCH_ARGS (more benchmarks/gpu.py ones),
# KDP_LEASE_RAY_ARGS (jobs/pipeline.py's placement, default --use-gpu --one-worker train).
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
BENCH_S=${1:-200}
RUN_MIN=${2:-5}
LEASE=${KDP_LEASE:-.gpu}
RUNS=${KDP_LEASE_RUNS:-runs}
PRESET=${KDP_LEASE_PRESET:-paper}
DATA=${KDP_LEASE_DATA:-$LEASE/cifar10.kdpjpeg}
LOG=$OUT/lease.log
export PYTHONUNBUFFERED=1 KDP_GIT_SHA=${KDP_GIT_SHA:-$(cat "$LEASE/commit" 2>/dev/null || echo unknown)}
say() { echo "[lease $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ls "$LEASE"/whl/*.whl >/dev/null 2>&1; then  # the machine has torch but no registry
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kdp-site "$LEASE"/whl/*.whl \
    || { say "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/kdp-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
say "commit $KDP_GIT_SHA; $(python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm \
  --format=csv >>"$LOG" 2>&1

if [ "$BENCH_S" != 0 ]; then
  say "benchmarks/gpu.py, $BENCH_S s of measuring"
  # shellcheck disable=SC2086
  timeout $((BENCH_S + 180)) python3 benchmarks/gpu.py --data "$DATA" --budget "$BENCH_S" \
    --out "$OUT/gpu.json" ${KDP_LEASE_BENCH_ARGS:-} >>"$LOG" 2>&1
  say "benchmark exit $?"
fi

RAY_TAR=$(ls "$LEASE"/ray.tar* 2>/dev/null | head -1)
if [ -n "$RAY_TAR" ]; then  # issue 25 step 6: Ray, its Train and NCCL, on the GPU
  say "Ray: benchmarks/ray_gpu.py, then jobs/pipeline.py ${KDP_LEASE_RAY_ARGS---use-gpu --one-worker train} (tiny, reduced) into ray.log"
  RAY_SITE=$(mktemp -d) && python3 -m tarfile -e "$RAY_TAR" "$RAY_SITE" || say "Ray unpack failed"
  (
    export PYTHONPATH=$RAY_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_USAGE_STATS_ENABLED=0 NCCL_DEBUG=VERSION
    timeout 90 python3 benchmarks/ray_gpu.py
    echo "ray_gpu.py exit $?"
    # shellcheck disable=SC2086
    timeout 180 python3 jobs/pipeline.py --preset tiny ${KDP_LEASE_RAY_ARGS---use-gpu --one-worker train} \
      --network host --data-dir "$DATA" --out "$RUNS-ray" --set baselines= --set eval.threat_models=classifier \
      --set students=at+nt --set eval.attacks=pgd8+fgsm
    echo "jobs/pipeline.py exit $?"
  ) >>"$OUT/ray.log" 2>&1
  say "$(grep -E '^\{|exit [0-9]+$' "$OUT/ray.log" | tr '\n' ' ')"
  rm -rf "$RAY_SITE"
fi

if [ "$RUN_MIN" = 0 ]; then
  tail -n 25 "$LOG"
  exit 0
fi
if [ -f "$LEASE/carry/carry.json" ]; then
  python3 -m kdp.carry unpack "$LEASE/carry" "$RUNS" >>"$LOG" 2>&1 || { say "unpack failed"; exit 4; }
fi
say "kdp run --preset $PRESET, $RUN_MIN min"
# shellcheck disable=SC2086
timeout "$(python3 -c "import sys; print(int(float(sys.argv[1]) * 60) + 120)" "$RUN_MIN")" python3 -m kdp run --preset "$PRESET" --data-dir "$DATA" \
  --out "$RUNS" --time-limit "$RUN_MIN" ${KDP_LEASE_ARGS:-} >>"$LOG" 2>&1
rc=$?
say "kdp run exit $rc (0: finished, 75: stopped at the time limit, 124: killed by timeout)"
name=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$RUNS"/*/config.json 2>/dev/null | head -1)
if [ -n "$name" ]; then
  python3 -m kdp.carry pack "$RUNS" "$name" "$OUT" --chunk-mib 15.5 >>"$LOG" 2>&1 || say "pack failed"
fi
tail -n 25 "$LOG"
exit $rc
