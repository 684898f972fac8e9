#!/usr/bin/env bash
# Makes sure Fashion-MNIST (the demo's data, Debian package dataset-fashion-mnist) is installed.
# Installs it when it is missing and this user may (root, or sudo without a password); otherwise prints the
# command to run and exits 2. Used by `make engine`, `make test` and .ci/run.
#
# Environment (for tests and unusual set-ups):
#   ENSURE_DATASET_DIR      where the IDX files must be (default /usr/share/datasets/fashion-mnist)
#   ENSURE_DATASET_APT_GET  the apt-get command to install with; set it empty to never install
#                           (default: apt-get as root, `sudo -n apt-get` with passwordless sudo, else empty)
set -euo pipefail

PACKAGE=dataset-fashion-mnist
DIR="${ENSURE_DATASET_DIR:-/usr/share/datasets/fashion-mnist}"
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

installed() {
    local name
    for name in "${FILES[@]}"; do
        [ -f "$DIR/$name" ] || [ -f "$DIR/$name.gz" ] || return 1
    done
}

installed && exit 0

if [ -n "${ENSURE_DATASET_APT_GET+set}" ]; then
    apt_get="$ENSURE_DATASET_APT_GET"
elif [ "$(id -u)" -eq 0 ]; then
    apt_get="apt-get"
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt_get="sudo -n apt-get"
else
    apt_get=""
fi

command_to_run="sudo apt-get update && sudo apt-get install -y $PACKAGE"
if [ -z "$apt_get" ]; then
    echo "error: Fashion-MNIST (the demo's data) is not in $DIR and this user cannot install it; run: $command_to_run" >&2
    exit 2
fi

echo "Fashion-MNIST is not in $DIR: installing $PACKAGE with $apt_get"
if ! { $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "$PACKAGE"; }; then
    echo "error: installing $PACKAGE failed (output above); fix that, then run: $command_to_run" >&2
    exit 2
fi
if ! installed; then
    echo "error: $PACKAGE installed, but $DIR still lacks ${FILES[*]}; reinstall it: $command_to_run" >&2
    exit 2
fi
