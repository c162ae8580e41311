#!/usr/bin/env bash
# A Cloud TPU VM slice (single host or pod): create it, install, run the SAME command on every
# worker, delete it.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup                      # ship this working tree + a Python 3.11 venv with jax[tpu]
#   launch/tpu_pod.sh sync                       # ship this working tree again (no install)
#   launch/tpu_pod.sh run CONFIG[:VARIANTS] WORKDIR [--config.key=value ...]
#                                                # sync, then start the run detached on every worker
#   launch/tpu_pod.sh logs [NAME]                # follow worker $WORKER's log of run NAME [latest]
#   launch/tpu_pod.sh stop [NAME]                # SIGTERM run NAME [latest]: checkpoint, exit 75
#   launch/tpu_pod.sh ssh 'COMMAND'              # any command on every worker
#   launch/tpu_pod.sh delete
#
# The working tree is shipped as it is (tracked files with their uncommitted changes, and new files
# git does not ignore), so a config written but not committed reaches the workers. `run` returns
# once every worker has started: the trainer runs under nohup in its own session (a dropped ssh
# connection does not stop it), each worker appending to REMOTE_DIR/logs/NAME.log on its own disk
# (NAME: RUN_NAME, default the WORKDIR's last path component), ending with the exit status.
#
# Environment (defaults in brackets):
#   TPU_NAME [flash-jax]   ZONE [us-west4-a]   PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v5litepod-8]   RUNTIME_VERSION [v2-alpha-tpuv5-lite]
#   SPOT=1          create a spot (preemptible) slice
#   REMOTE_DIR      checkout location on the workers [flash-jax, in the home directory]
#   JAX_VERSION     jax[tpu] version [the jax pin of requirements.txt]
#   RUN_NAME        run: the log's name [basename of WORKDIR]      WORKER  logs: which worker [0]
#   DRY_RUN=1       print the gcloud commands instead of running them (the archive is still written)
# WORKDIR must be storage every worker sees (a gs:// bucket or a mounted filesystem): every worker
# writes its shard of each checkpoint there. jax.distributed is initialised by the trainer; on TPU
# VMs it finds its peers without any address.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu_name=${TPU_NAME:-flash-jax}
zone=${ZONE:-us-west4-a}
accelerator=${ACCELERATOR_TYPE:-v5litepod-8}
runtime=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
remote_dir=${REMOTE_DIR:-flash-jax}
jax_version=${JAX_VERSION:-$(sed -n 's/^jax\[cpu\]==\([0-9.]*\).*/\1/p' "$root/requirements.txt")}
project_args=()
[[ -n ${PROJECT:-} ]] && project_args=(--project "$PROJECT")

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_all_workers() {  # on_all_workers 'COMMAND': the same command on every worker, in parallel
  run gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" "${project_args[@]}" \
    --worker=all --command "$1"
}

usage() {
  sed -n '2,35p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

ship() {  # the working tree (not git-ignored files) to REMOTE_DIR on every worker
  local archive=${TMPDIR:-/tmp}/flash-jax-$$.tar.gz
  git -C "$root" ls-files -z --cached --others --exclude-standard \
    | tar -C "$root" --null --ignore-failed-read -T - -czf "$archive" 2>/dev/null
  echo "# archive $archive ($(tar tzf "$archive" | wc -l) files)"
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:flash-jax.tar.gz" --zone "$zone" \
    "${project_args[@]}" --worker=all
  on_all_workers "set -e; mkdir -p $remote_dir && tar xzf flash-jax.tar.gz -C $remote_dir"
  [[ ${DRY_RUN:-0} == 1 ]] || rm -f "$archive"
}

run_name() {  # NAME of a run: letters, digits and ._- only
  local name=${1:-latest}
  echo "${name//[^A-Za-z0-9._-]/_}"
}

[[ $# -ge 1 ]] || usage
action=$1
shift
case $action in
  create)
    spot=()
    [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
    run gcloud compute tpus tpu-vm create "$tpu_name" --zone "$zone" "${project_args[@]}" \
      --accelerator-type "$accelerator" --version "$runtime" "${spot[@]}"
    ;;
  setup)
    ship
    on_all_workers "set -e; cd $remote_dir && python3 -m pip install -q --user uv \
&& python3 -m uv venv -q --python 3.11 .venv \
&& python3 -m uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==$jax_version'"
    ;;
  sync)
    ship
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    config=$1
    workdir=$2
    shift 2
    name=$(run_name "${RUN_NAME:-$(basename "$workdir")}")
    trainer=$(printf ' %q' .venv/bin/python -m flash_jax.main --config "$config" --workdir "$workdir" "$@")
    job="$trainer ; echo \"[tpu_pod.sh] exit status \$? on \$(hostname)\""
    ship
    on_all_workers "cd $remote_dir && mkdir -p logs && ln -sfn $name.log logs/latest.log \
&& ln -sfn $name.pid logs/latest.pid \
&& { setsid nohup bash -c $(printf %q "$job") >> logs/$name.log 2>&1 < /dev/null & \
echo \$! > logs/$name.pid; } && echo \"\$(hostname): started, log $remote_dir/logs/$name.log\""
    ;;
  logs)
    [[ $# -le 1 ]] || usage
    run gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" "${project_args[@]}" \
      "--worker=${WORKER:-0}" --command "tail -n +1 -F $remote_dir/logs/$(run_name "${1:-}").log"
    ;;
  stop)
    [[ $# -le 1 ]] || usage
    on_all_workers "pkill -TERM -P \$(cat $remote_dir/logs/$(run_name "${1:-}").pid)"  # the trainer
    ;;
  ssh)
    [[ $# -eq 1 ]] || usage
    on_all_workers "$1"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$tpu_name" --zone "$zone" "${project_args[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
