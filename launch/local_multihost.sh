#!/usr/bin/env bash
# Simulate an N-host run on one machine: N processes of the main job, one CPU device each,
# joined by jax.distributed with gloo collectives. Same flags as the main job.
#   bash launch/local_multihost.sh 2 --config=configs/convirt.py:smoke --workdir=runs/two_hosts
# Exits non-zero if any process fails; each process's log is in $LOG_DIR (default: a temp dir).
set -euo pipefail
n=${1:?usage: local_multihost.sh NUM_PROCESSES MAIN_FLAGS...}
shift
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    MEDVL_CPU_COLLECTIVES=1 JAX_PLATFORMS=cpu \
    "$python" -m medvl_jax.main "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $n processes (coordinator 127.0.0.1:$port); logs in $log_dir"
rc=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; last lines of $log_dir/process_$i.log:" >&2
    grep -v "^  " "$log_dir/process_$i.log" | tail -n 25 >&2
    rc=1
  fi
done
exit $rc
