#!/usr/bin/env bash
# Installs flatpod and everything it runs with on a Debian 12 machine, then starts
# `flatpod serve` with its embedded defaults (Ctrl-C stops the daemon; pods keep running).
#
#   sudo ./hack/setup.sh               install, then run flatpod serve in the foreground
#   sudo ./hack/setup.sh --no-start    install only
#   sudo ./hack/setup.sh --test        install, with the test dependencies, and do not start
#   sudo ./hack/setup.sh --enable-ksm  also start the kernel's same-page merging daemon (ksmd):
#                                      a host-wide setting, see README "Memory per pod"
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLATPOD_VENV:-/opt/flatpod/venv}
start=1
extras=""
enable_ksm=0
for arg in "$@"; do
  case "$arg" in
    --no-start) start=0 ;;
    --test) start=0; extras="[test]" ;;
    --enable-ksm) enable_ksm=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (flatpod manages namespaces, mounts and cgroups)" >&2
  exit 1
fi

# What flatpod runs: the OCI runtime (runc, the default handler; crun for a [runtimes.crun]
# handler, see the README), the pause, netlink and firewall tools, CNI plugins, CRIU (runc's
# checkpoint and restore); busybox and docker-registry are for the test images and registry.
packages=(
  runc crun catatonit criu iproute2 iptables nftables conntrack containernetworking-plugins
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

# ksmd is the host's: flatpod only marks shim memory mergeable (shim_page_merging = "advise").
# Merging saves ~1.9 MiB per pod, but it is host-wide and memory deduplication is a
# cross-tenant timing side channel, so it is only switched on when asked for.
ksm_run=/sys/kernel/mm/ksm/run
if [ "$enable_ksm" -eq 1 ]; then
  if [ -w "$ksm_run" ]; then
    echo 1 > "$ksm_run"
    echo "setup.sh: ksmd started (host-wide; it stays on until reboot or 'echo 0 > $ksm_run')"
  else
    echo "setup.sh: this kernel has no KSM ($ksm_run); --enable-ksm ignored" >&2
  fi
elif [ -r "$ksm_run" ] && [ "$(cat "$ksm_run")" = "0" ]; then
  echo "setup.sh: ksmd is stopped, so each pod's shim keeps ~1.6 MiB private instead of ~0.24 MiB."
  echo "  To merge shim memory, rerun with --enable-ksm (or 'echo 1 > $ksm_run'). It costs ~2%"
  echo "  of one CPU and lets tenants probe each other's memory by timing (README: Memory per pod)."
fi

if [ "$start" -eq 1 ]; then
  exec flatpod serve
fi
