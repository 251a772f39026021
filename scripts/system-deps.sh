#!/usr/bin/env bash
# Installs the system packages the project needs when they are missing.
# Debian/Ubuntu as root: apt-get. macOS: Homebrew. Anything else: say what is missing and go on,
# because the Python parts still work and the tests that need these packages skip with a reason.
set -euo pipefail

debian_pkgs=(openmpi-bin libopenmpi-dev libopenblas0-pthread openssh-server iproute2 nftables python3-venv util-linux rsync)

if [[ "$(uname -s)" == "Darwin" ]]; then
    if command -v brew >/dev/null && ! command -v mpirun >/dev/null; then
        brew install open-mpi
    fi
    exit 0
fi

command -v dpkg-query >/dev/null || { echo "system-deps: not Debian; install OpenMPI and OpenBLAS yourself"; exit 0; }

missing=()
for p in "${debian_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
