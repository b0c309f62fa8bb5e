#!/usr/bin/env bash
# What the image is built from, as one hash: every file of the node's package and its build
# settings as they are in this checkout (committed or not). build.sh labels the image with it;
# tests/test_image.py runs the image only when it matches (an image of other code tests nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
git ls-files -z --cached --others --exclude-standard -- node pipelines pyproject.toml \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
