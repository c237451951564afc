#!/usr/bin/env bash
# A Cloud TPU pod slice run: create the slice, copy this checkout to every worker, run the same
# command on all workers (JAX detects the slice: medvl_jax/parallel/distributed.py), tail, delete.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=TYPE \
#     [--version=RUNTIME] [--project=PROJECT] [--workers=N] STEP [MAIN_FLAGS...]
#
# STEP: create | copy | run | tail | delete | all (create, copy, run: the whole sequence).
# MAIN_FLAGS go to `python -m medvl_jax.main` unchanged, identical on every worker, e.g.
#   launch/tpu_pod.sh --name=cxr --zone=us-west4-a --accelerator=v5litepod-16 all \
#     --config=configs/convirt.py --config.batch_size=4096 --workdir=gs://my-bucket/runs/convirt
# Check first that a step fits the chips' memory, on this machine, without a pod:
#   python -m medvl_jax.main --config=... --compile_only --topology=v5e:4x4
# --dry-run prints every gcloud command (and what each worker runs) and runs none.
# The workdir must be a gs:// URL or a filesystem every worker sees; docs/pod.md walks through
# a run with its workdir and data dir in a bucket.
set -euo pipefail

dry_run=0 name="" zone="" accelerator="" version="" project="" workers=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    -*) echo "error: tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
step=${1:-}
[ "$#" -gt 0 ] && shift
case "$step" in
  create | copy | run | tail | delete | all) ;;
  *) echo "error: tpu_pod.sh: STEP must be create, copy, run, tail, delete or all (got '${step}')" >&2; exit 2 ;;
esac
[ -n "$name" ] || { echo "error: tpu_pod.sh: --name=NAME is required" >&2; exit 2; }
[ -n "$zone" ] || { echo "error: tpu_pod.sh: --zone=ZONE is required" >&2; exit 2; }

# Hosts of a slice, from the accelerator type (Cloud TPU docs: v2/v3/v4/v5p count TensorCores,
# 8 per host; v5e (v5litepod) and v6e count chips, 4 per host beyond the single 8-chip host).
hosts_of() {
  local type=$1 n=${1##*-}
  case "$type" in
    v2-* | v3-* | v4-* | v5p-*) echo $(((n + 7) / 8)) ;;
    v5litepod-* | v5e-* | v6e-*) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;
    *) echo "" ;;
  esac
}
if [ -z "$workers" ]; then
  [ -n "$accelerator" ] || { echo "error: tpu_pod.sh: --accelerator=TYPE (e.g. v5litepod-16) is required" >&2; exit 2; }
  workers=$(hosts_of "$accelerator")
  [ -n "$workers" ] || { echo "error: tpu_pod.sh: unknown --accelerator=$accelerator (e.g. v4-32, v5litepod-16, v5p-16, v6e-16); pass --workers=N" >&2; exit 2; }
fi
if [ -z "$version" ]; then
  case "$accelerator" in
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

# Shell-quotes one word (remote command, dry-run print): bare if safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@,+%~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")
remote_dir='~/medvl_jax'
log='~/medvl_jax_run.log'
main_cmd="cd $remote_dir && nohup .venv/bin/python -m medvl_jax.main"
for a in "$@"; do main_cmd+=" $(quote "$a")"; done
main_cmd+=" > $log 2>&1 &"
install_cmd="cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e .[tpu]"

# Runs (or, with --dry-run, prints) one command.
do_cmd() {
  if [ "$dry_run" = 1 ]; then
    local out="" w
    for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
    echo "$out"
  else
    "$@"
  fi
}
per_worker() {  # what `--worker=all` runs, worker by worker (dry run only)
  if [ "$dry_run" = 1 ]; then
    for ((w = 0; w < workers; w++)); do echo "#   worker $w/$workers: $1"; done
  fi
}

do_create() {
  do_cmd "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version"
}
do_copy() {
  local src
  src=$(cd "$(dirname "$0")/.." && pwd)
  do_cmd "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p $remote_dir"
  do_cmd "${gcloud_tpu[@]}" scp --recurse "$src/setup.py" "$src/medvl_jax" "$src/configs" "$src/data_pipelines" \
    "$name:$remote_dir" "${where[@]}" --worker=all
  per_worker "$install_cmd"
  do_cmd "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install_cmd"
}
do_run() {
  [ "$#" -gt 0 ] || { echo "error: tpu_pod.sh: run needs MAIN_FLAGS (at least --config=...)" >&2; exit 2; }
  per_worker "$main_cmd"
  do_cmd "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$main_cmd"
}
do_tail() {  # worker 0 logs the progress lines of the whole job
  do_cmd "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="tail -n 50 -F $log"
}
do_delete() {
  do_cmd "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
}

[ "$dry_run" = 1 ] && echo "# tpu_pod.sh --dry-run: $name ($accelerator, $workers workers) in $zone; nothing is run"
case "$step" in
  create) do_create ;;
  copy) do_copy ;;
  run) do_run "$@" ;;
  tail) do_tail ;;
  delete) do_delete ;;
  all)
    [ "$#" -gt 0 ] || { echo "error: tpu_pod.sh: all needs MAIN_FLAGS (at least --config=...)" >&2; exit 2; }
    do_create
    do_copy
    do_run "$@"
    echo "# started on $workers workers; follow with: $0 --name=$name --zone=$zone --accelerator=$accelerator tail"
    echo "# and delete the slice when done:          $0 --name=$name --zone=$zone --accelerator=$accelerator delete"
    ;;
esac
