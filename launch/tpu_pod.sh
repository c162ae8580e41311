#!/usr/bin/env bash
# A Cloud TPU VM slice (single host or pod): create it, install, run the SAME command on every
# worker, delete it.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup                      # this checkout + a Python 3.11 venv with jax[tpu]
#   launch/tpu_pod.sh run CONFIG[:VARIANTS] WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh ssh 'COMMAND'              # any command on every worker
#   launch/tpu_pod.sh delete
#
# Environment (defaults in brackets):
#   TPU_NAME [flash-jax]   ZONE [us-west4-a]   PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v5litepod-8]   RUNTIME_VERSION [v2-alpha-tpuv5-lite]
#   SPOT=1          create a spot (preemptible) slice
#   REMOTE_DIR      checkout location on the workers [flash-jax, in the home directory]
#   JAX_VERSION     jax[tpu] version [the jax pin of requirements.txt]
#   DRY_RUN=1       print the gcloud commands instead of running them
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
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
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
    archive=${TMPDIR:-/tmp}/flash-jax-$$.tar.gz
    run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:flash-jax.tar.gz" --zone "$zone" \
      "${project_args[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $remote_dir && tar xzf flash-jax.tar.gz -C $remote_dir \
&& cd $remote_dir && python3 -m pip install -q --user uv \
&& python3 -m uv venv -q --python 3.11 .venv \
&& python3 -m uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==$jax_version'"
    [[ ${DRY_RUN:-0} == 1 ]] || rm -f "$archive"
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    config=$1
    workdir=$2
    shift 2
    args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
    on_all_workers "cd $remote_dir && .venv/bin/python -m flash_jax.main$args"
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
