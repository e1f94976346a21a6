#!/usr/bin/env bash
# Phase 2 of benchmarks/stage_b_learning.py on the GPU machine: both datasets trained and generated side by side on
# one GPU (each is launch-bound, so they share it well), the packs written to $OUT. Run from the repository root,
# with the wheels the image lacks in .whl/site.tar.xz (an unpacked site-packages tree) and the held-out real
# dataset in .device_carry/real256 (stage_b_learning.py prepare-real).
#   bash benchmarks/stage_b_learning_gpu.sh [extra train arguments, e.g. --stage1-seconds 180]
# PHASE=train / PHASE=evaluate split the work over two device calls (the work folder, .device_work/ in the
# checkout, survives while the machine stays warm); the default PHASE=all does both in one call.
set -u
OUT=${OUT:-/tmp/stage_b_learning_out}; mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ]; then  # wheels unpacked (xz travels smaller than the wheels' zip)
  mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the checkout (scripts in benchmarks/), then the wheels
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
W=${WORK:-$PWD/.device_work}
PHASE=${PHASE:-all}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 benchmarks/stage_b_learning.py train --dataset synthetic --work "$W/synthetic" --out "$OUT/synthetic.tar.gz" --phase "$PHASE" \
  "$@" > "$OUT/synthetic.log" 2>&1 &
python3 benchmarks/stage_b_learning.py train --dataset real --data .device_carry/real256 --work "$W/real" \
  --out "$OUT/real.tar.gz" --phase "$PHASE" "$@" > "$OUT/real.log" 2>&1 &
( while sleep 20; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ps -eo pid,etimes,pcpu,rss,args --sort=-pcpu | grep -E "[p]ython3 .*(train|evaluate)\.py" | cut -c1-160 | head -4
  done ) > "$OUT/gpu_usage.log" 2>&1 &
wait %1 %2
status=$?
kill %3 2>/dev/null
( cd "$W" && tar -czf "$OUT/logs.tar.gz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.mp4' \
    */train.log */evaluate_*.log */logs/train/*/*/train.log 2>/dev/null )
for name in synthetic real; do echo "== $name"; tail -n 12 "$OUT/$name.log"; done
sort -t, -k2 -n "$OUT/gpu_usage.log" | tail -n 1 | sed 's/^/peak sample: /'
exit $status
