#!/bin/bash
# One-shot device script: screen actor-entropy weights with the cpu preset on reacher_easy,
# all runs at once, until the deadline; then the actor's saturation on each run's replay.
# Usage: bash .gpu/screen.sh OUTDIR BUDGET_SECONDS
OUT=${1:-/tmp/out}; BUDGET=${2:-540}; START=$(date +%s)
mkdir -p $OUT /tmp/runs
exec > >(tee $OUT/setup.log) 2>&1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PY=${PY:-python3}
if [ -d .gpu/gl ] && [ "$(id -u)" = 0 ] && [ -z "$LOCAL_TEST" ]; then
  for f in .gpu/gl/*.deb; do dpkg -x $f /; done; ldconfig
fi
if [ -z "$LOCAL_TEST" ]; then mkdir -p /tmp/site && tar -xJf .gpu/site312.tar.xz -C /tmp/site; export PYTHONPATH=/tmp/site; fi
export MUJOCO_GL=egl PYTHONUNBUFFERED=1
date; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -1
$PY -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)"
probe='from dm_control import suite; e=suite.load("reacher","easy"); e.reset(); im=e.physics.render(64,64,camera_id=0); print("render ok", im.shape, im.mean())'
if ! $PY -c "$probe"; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  echo "retry with __EGL_VENDOR_LIBRARY_FILENAMES"; $PY -c "$probe" || echo "RENDER FAILED"
fi
DEV=${DEV:-cuda}
ETAS=${ETAS:-0 0.01 0.03 0.1}; SEEDS=${SEEDS:-2 3}; PRESET=${PRESET:-cpu}
T=$(( $(left) - 60 )); [ $T -lt 30 ] && T=30; echo "=== training for $T s"
for eta in $ETAS; do for s in $SEEDS; do
  n=eta$eta-s$s
  OMP_NUM_THREADS=2 timeout -s INT -k 30 $T $PY dreamer.py --env reacher_easy --preset $PRESET \
    --device $DEV --seed $s --actor_entropy $eta --eval_every 5000 --logdir /tmp/runs/$n $TRAIN_FLAGS \
    > /tmp/runs/$n.log 2>&1 &
  PIDS="$PIDS $!"
done; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > /tmp/runs/smi.log 2>&1 &
SMI=$!
wait $PIDS; kill $SMI
for eta in $ETAS; do for s in $SEEDS; do
  n=eta$eta-s$s; echo "--- $n"; tail -3 /tmp/runs/$n.log
  OMP_NUM_THREADS=2 timeout 40 $PY .gpu/actstats.py /tmp/runs/$n > /tmp/runs/$n.act 2>&1 &
  APIDS="$APIDS $!"
done; done
wait $APIDS   # (a bare wait would also wait for the tee above)
for eta in $ETAS; do for s in $SEEDS; do cat /tmp/runs/eta$eta-s$s.act | cut -c1-220; done; done
cd /tmp/runs && tar -czf $OUT/runs.tgz --exclude=episodes --exclude=checkpoint.pt .
ls -la $OUT; echo "done, left $(left) s"
