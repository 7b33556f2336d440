#!/usr/bin/env bash
# Installs flatpod and everything it runs with on a Debian 12 machine, then starts
# `flatpod serve` with its embedded defaults (Ctrl-C stops the daemon; pods keep running).
#
#   sudo ./hack/setup.sh               install, then run flatpod serve in the foreground
#   sudo ./hack/setup.sh --no-start    install only
#   sudo ./hack/setup.sh --test        install, with the test dependencies, and do not start
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLATPOD_VENV:-/opt/flatpod/venv}
start=1
extras=""
for arg in "$@"; do
  case "$arg" in
    --no-start) start=0 ;;
    --test) start=0; extras="[test]" ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (flatpod manages namespaces, mounts and cgroups)" >&2
  exit 1
fi

# What flatpod runs: the OCI runtime, the pause, netlink and firewall tools, CNI plugins;
# busybox and docker-registry are for the test images and the test registry.
packages=(
  runc catatonit iproute2 iptables nftables conntrack containernetworking-plugins
  busybox-static docker-registry zstd sqlite3 python3 python3-venv python3-dev gcc
  ca-certificates procps util-linux
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 is 3.11 on bookworm; a newer python3 on PATH works too.
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
if [ -n "$extras" ]; then
  "$venv/bin/pip" install -q -e "$repo$extras"
else
  # From a copy: setuptools builds a non-editable install in the source tree (build/ and
  # *.egg-info), and the checkout is no place for that.
  src=$(mktemp -d)
  tar -C "$repo" --exclude=./.git --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$src" -xf -
  "$venv/bin/pip" install -q "$src" || { rm -rf "$src"; exit 1; }
  rm -rf "$src"
fi
ln -sf "$venv/bin/flatpod" /usr/local/bin/flatpod
echo "setup.sh: $(flatpod --version) installed in $venv"

if [ "$start" -eq 1 ]; then
  exec flatpod serve
fi
