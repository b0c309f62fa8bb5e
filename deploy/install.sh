#!/usr/bin/env bash
# Install ainode on Debian 12: system packages, a virtual environment in ./.venv, the node.
#   deploy/install.sh          the node (CPU build of torch)
#   deploy/install.sh --test   the node, its test extras, and the test peers
#                              (DCMTK, dicom3tools, Orthanc, PostgreSQL, and Chromium,
#                              nginx and npm for the OHIF viewer check)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
[[ "${1:-}" == "--test" ]] && with_tests=true

sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

packages=(python3 python3-venv python3-dev gcc dcmtk)
$with_tests && packages+=(dicom3tools orthanc orthanc-dicomweb postgresql curl chromium nginx-light)
# npm fetches the OHIF build once for the viewer check; a node.js installed otherwise may ship it.
$with_tests && ! command -v npm >/dev/null && packages+=(npm)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo_if_needed apt-get update -qq
  # policy-rc.d: the test peers are started by the tests, not as system services.
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; a plain `torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
if $with_tests; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
echo "ainode installed in $(pwd)/.venv"
