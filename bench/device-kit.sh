#!/usr/bin/env bash
# Build .device-kit/, what a GPU machine lent by the `device` tool needs to run
# bench/device-run.sh: that machine's image has Python 3.12 with torch, numpy and SciPy but
# reaches no package registry, and what travels to it is at most 64 MiB. So the kit holds
# Python 3.12 x86-64 wheels of the few packages the pipelines need beyond the image, and
# P001 (148 slices, the size the latency targets are set for). Run it here;
# then the device tool's run: carry [".device-kit"], command "bash bench/device-run.sh".
set -euo pipefail
cd "$(dirname "$0")/.."

data=${AINODE_DATA:-../shared/data}
kit=.device-kit
pip=.venv/bin/pip
needed='nibabel|pydicom|pylibjpeg|pylibjpeg-libjpeg|monai|edt|pydantic|pydantic_core|annotated-types|typing-inspection'
rm -rf "$kit"
mkdir -p "$kit/wheels" "$kit/data/covid-ct-md/covid"

wheel() {  # a CPython 3.12 x86-64 wheel of requirement $1
  "$pip" download --quiet --no-deps --only-binary=:all: --dest "$kit/wheels" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any "$1" 2>/dev/null
}
# The versions the tests ran with here, or, where one has no 3.12 wheel, the newest that has.
for requirement in $("$pip" list --format=freeze | grep -i -E "^($needed)=="); do
  wheel "$requirement" || wheel "${requirement%%==*}" ||
    { echo "no Python 3.12 wheel of ${requirement%%==*}" >&2; exit 1; }
done
cp -r "$data/covid-ct-md/covid/P001" "$kit/data/covid-ct-md/covid/"
du -sh "$kit" "$kit/wheels" "$kit/data"
