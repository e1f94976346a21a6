#!/usr/bin/env bash
# Phase 2 of benchmarks/stage_b_learning.py on the GPU machine: both datasets trained and generated side by side on
# one GPU (time-sliced between the two processes), the packs written to $OUT. Run from the repository root,
# with the wheels the image lacks in .whl/site.tar.xz (an unpacked site-packages tree) and the held-out real
# dataset in .device_carry/real256 (stage_b_learning.py prepare-real).
#   bash benchmarks/stage_b_learning_gpu.sh [extra train arguments, e.g. --stage1-seconds 180]
# PHASE=train / PHASE=evaluate split the work over two device calls (the work folder, .device_work/ in the
# checkout, survives while the machine stays warm); the default PHASE=all does both in one call.
# DATASETS="synthetic real" (the default) shares the GPU between the two, time-sliced; DATASETS=synthetic or
# DATASETS=real gives one dataset the whole GPU (about twice the steps in the same budgets).
set -u
OUT=${OUT:-/tmp/stage_b_learning_out}; mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ]; then  # wheels unpacked (xz travels smaller than the wheels' zip)
  # Unpacked once per machine and tarball, into a new folder renamed into place: a second run of this script beside
  # a first (one dataset evaluated while another trains) used to unpack over the libraries the first had mapped,
  # and two of its evaluate.py processes died of a bus error importing decord (2026-12-04).
  unpack() {  # under a lock: two scripts starting together unpack once
    local stamp fresh old
    stamp=$(cksum < .whl/site.tar.xz)
    [ "$(cat /tmp/site/.unpacked 2>/dev/null)" = "$stamp" ] && return 0
    fresh=$(mktemp -d /tmp/site.XXXXXX) && tar -xJf .whl/site.tar.xz -C "$fresh" && echo "$stamp" > "$fresh/.unpacked" \
      || return 1
    old=$(mktemp -u /tmp/site.old.XXXXXX)
    if [ -d /tmp/site ]; then mv /tmp/site "$old" || return 1; fi  # a running import keeps the files it opened
    mv "$fresh" /tmp/site
  }
  exec 9> /tmp/site.lock && flock 9 && unpack && exec 9>&- || { echo "could not unpack .whl/site.tar.xz" >&2; exit 1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the checkout (scripts in benchmarks/), then the wheels
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
W=${WORK:-$PWD/.device_work}; mkdir -p "$W"
PHASE=${PHASE:-all}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
DATASETS=${DATASETS:-synthetic real}
jobs=()
for name in $DATASETS; do
  case $name in
    synthetic) data=() ;;
    real) data=(--data .device_carry/real256) ;;
    *) echo "DATASETS: unknown dataset '$name' (synthetic, real)" >&2; exit 2 ;;
  esac
  setsid python3 benchmarks/stage_b_learning.py train --dataset "$name" ${data[@]+"${data[@]}"} --work "$W/$name" \
    --out "$OUT/$name.tar.gz" --phase "$PHASE" "$@" > "$W/$name.$PHASE.log" 2>&1 &
  jobs+=($!)  # each run leads its own process group (setsid): stopping it stops its train.py / evaluate.py too
done
pack_logs() {  # $OUT returns at most 8 files of 16 MiB: every log travels in one archive, beside the packs
  ( cd "$W" && tar -czf "$OUT/logs.tar.gz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.mp4' \
      *.log */*.log */*.out */logs/train/*/*/train.log 2>/dev/null )
}
stopped() {  # the call's limit (timeout's SIGTERM): stop the runs, keep their logs
  echo "stopped from outside: the runs are ended and their logs packed" >&2
  for job in "${jobs[@]}"; do kill -TERM -- "-$job" 2>/dev/null; done
  kill "${monitor:-}" 2>/dev/null; sleep 3; pack_logs; exit 124
}
trap stopped TERM INT
( while sleep 20; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ps -eo pid,etimes,pcpu,rss,args --sort=-pcpu | grep -E "[p]ython3 .*(train|evaluate)\.py" | cut -c1-160 | head -4
  done ) > "$W/gpu_usage.$PHASE.log" 2>&1 &
monitor=$!
status=0
for job in "${jobs[@]}"; do wait "$job" || status=$?; done
kill "$monitor" 2>/dev/null
pack_logs
for name in $DATASETS; do echo "== $name"; tail -n 12 "$W/$name.$PHASE.log"; done
sort -t, -k2 -n "$W/gpu_usage.$PHASE.log" | tail -n 1 | sed 's/^/peak sample: /'
ls -la "$OUT"
exit $status
