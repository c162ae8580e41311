#!/usr/bin/env bash
# One training run on this machine, on all its local devices (CPU, one GPU host, one TPU VM).
#
#   launch/local.sh CONFIG[:VARIANTS] WORKDIR [--config.key=value ...]
#
# Environment:
#   PYTHON    interpreter (default: the checkout's .venv/bin/python, else python3)
#   DRY_RUN=1 print the command instead of running it
# Rerunning the same command resumes from WORKDIR's newest checkpoint.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:VARIANTS] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_python=python3
[[ -x "$root/.venv/bin/python" ]] && default_python="$root/.venv/bin/python"
python=${PYTHON:-$default_python}

cmd=("$python" -m flash_jax.main --config "$config" --workdir "$workdir" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "cd $(printf '%q' "$root")"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
cd "$root"
exec "${cmd[@]}"
