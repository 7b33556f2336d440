#!/usr/bin/env bash
# Runs the systemd + cgroup v2 tests (hack/vm-tests.txt) inside a throwaway Debian 12 VM with
# systemd as PID 1 and the pure cgroup v2 hierarchy, booted by ../shared/vm (mkvm.sh, runvm.sh).
#
#   sudo hack/vm-test.sh                      the tests listed in hack/vm-tests.txt
#   sudo hack/vm-test.sh tests/test_x.py ...  these pytest node ids instead
#   sudo hack/vm-test.sh --check              only says whether this machine can run the stage
#   sudo KUBELET=/path/to/kubelet hack/vm-test.sh ...   also the kubelet tests (tests/test_kubelet.py
#                                             skips without a kubelet; none is built here)
#   sudo hack/vm-test.sh --node-e2e FOCUS [SKIP [e2e_node.test flags...]]
#                                             Kubernetes' node e2e suite (../shared/node-e2e)
#                                             in the VM instead of pytest (hack/vm-node-e2e.sh)
#
# Steps, each timed: host packages (qemu, mmdebstrap...; apt-get when missing), the VM image
# (built once per package list, kept in $VM_DIR), a wheelhouse for the guest's Python made on
# the host (the guest reaches no network), then boot, a venv from the wheelhouse, flatpod
# installed in it, pytest. Results: $VM_OUT (junit.xml, pytest.log, journal.txt, phases.txt).
#
# Exit: 0 passed, 1 failed, 77 skipped (this machine cannot run a VM: no qemu, not root...).
# Env: VM_DIR (/var/tmp/flatpod-vm), VM_OUT ($VM_DIR/out), VM_EXTRA_PACKAGES (more Debian
#      packages for the image), VM_ACCEL (auto|kvm|tcg), VM_MEM (MiB, 2048), VM_CPUS (2),
#      VM_TIMEOUT (seconds for the job inside, 1800), FLATPOD_VM_TOOLS (../shared/vm),
#      KUBELET (a kubelet binary for the guest; its directory is shared, the guest copies it).
#      --node-e2e: NODE_E2E_HARNESS (../shared/node-e2e), NODE_E2E_BIN (ginkgo, e2e_node.test,
#      kubelet; /var/tmp/flatpod-node-e2e/bin), CRICTL (crictl on PATH), NODE_E2E_REGISTRY_PORT
#      (the host's 127.0.0.1 registry of stand-in images, 5000).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# ../shared/vm next to the repository; from a git worktree, next to its main checkout.
vm_tools() {
  local main
  main=$(cd "$repo" && cd "$(git rev-parse --git-common-dir 2>/dev/null || echo .)/.." && pwd)
  for dir in "$repo/../shared/vm" "$main/../shared/vm"; do
    [ -x "$dir/runvm.sh" ] && { (cd "$dir" && pwd); return; }
  done
  echo "$repo/../shared/vm"
}
tools=${FLATPOD_VM_TOOLS:-$(vm_tools)}
vm_dir=${VM_DIR:-/var/tmp/flatpod-vm}
out=${VM_OUT:-$vm_dir/out}
host_packages=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs socat)
# What flatpod and its tests run with inside the guest (runc, iptables, iproute2 and
# busybox-static are in every image mkvm.sh builds). Changing this list builds a new image.
guest_packages="python3,python3-venv,crun,catatonit,nftables,conntrack"
guest_packages="$guest_packages,containernetworking-plugins,docker-registry,zstd,sqlite3,criu"
[ -n "${VM_EXTRA_PACKAGES:-}" ] && guest_packages="$guest_packages,$VM_EXTRA_PACKAGES"
# From the project's test extras, only what the VM tests import (no linters, no kubelet client,
# no hypothesis: fewer files to install under an emulated CPU).
guest_test_requirements="pytest"

started=$(date +%s)
declare -A took=()
phase_start=0
begin() { phase_start=$(date +%s); echo "== vm-test: $1"; }
end() { took[$1]=$(( $(date +%s) - phase_start )); }
timings() {
  local p line=""
  for p in host-packages image wheels boot venv tests; do
    [ -n "${took[$p]:-}" ] && line="$line $p ${took[$p]}s,"
  done
  echo "${line%,}"
}
skip() { echo "vm-test: SKIPPED: $*"; exit 77; }

# --- can this machine run it? -----------------------------------------------------------------
missing_host_packages() {
  local p
  for p in "${host_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

preflight() {
  [ "$(id -u)" = 0 ] || skip "needs root (the image build chroots, the guest runs as root)"
  [ "$(uname -m)" = x86_64 ] || skip "the VM image is x86_64 and this host is $(uname -m)"
  [ -x "$tools/mkvm.sh" ] && [ -x "$tools/runvm.sh" ] \
    || skip "no VM tools in $tools (mkvm.sh, runvm.sh; FLATPOD_VM_TOOLS overrides)"
  command -v dpkg-query >/dev/null || skip "not a Debian host (no dpkg-query)"
}

install_host_packages() {
  local missing
  missing=$(missing_host_packages)
  [ -z "$missing" ] && return 0
  echo "vm-test: installing ${missing//$'\n'/ }"
  # shellcheck disable=SC2086 # one word per package
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
    skip "cannot install ${missing//$'\n'/ } with apt-get"
  fi
}

# --- the image ----------------------------------------------------------------------------------
# One image per package list and mkvm.sh version, so a changed list builds a new one and the
# old one stays usable for whoever still runs it.
image_dir() {
  local key
  key=$( { echo "$guest_packages"; cat "$tools/mkvm.sh"; } | sha256sum | cut -c1-12)
  echo "$vm_dir/img-$key"
}

build_image() {
  local img=$1
  [ -r "$img/rootfs.img" ] && [ -r "$img/build-info.txt" ] && return 0
  mkdir -p "$vm_dir"
  (
    flock 9  # another run building the same image: wait for it, then use its result
    [ -r "$img/build-info.txt" ] && exit 0
    rm -rf "$img"
    VM_EXTRA_PACKAGES=$guest_packages VM_BUILD_DIR="$img.build" "$tools/mkvm.sh" "$img" \
      || { rm -rf "$img" "$img.build"; exit 1; }
  ) 9>"$img.lock"
}

# The guest's python3 as major.minor, from the image's package list (e.g. 3.11).
guest_python_version() {
  awk '$1 == "python3" { split($2, v, "."); print v[1] "." v[2] }' "$1/packages.txt"
}

# --- the wheelhouse -----------------------------------------------------------------------------
# A host interpreter of the guest's Python version (wheels with extension modules are built
# for one; cgroupspy has no wheel at all, so `pip download --platform` alone cannot do it):
# flatpod's venv when it matches, else pythonX.Y with a throwaway venv for pip.
host_pip_for() {
  local pyver=$1 venv=${FLATPOD_VENV:-/opt/flatpod/venv} py
  if [ -x "$venv/bin/pip" ] && [ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$pyver" ]; then
    echo "$venv/bin/pip"; return
  fi
  py=$(command -v "python$pyver") || return 1
  [ -x "$vm_dir/host-venv-$pyver/bin/pip" ] || "$py" -m venv "$vm_dir/host-venv-$pyver" >&2 || return 1
  echo "$vm_dir/host-venv-$pyver/bin/pip"
}

# flatpod's dependencies and the test requirements as wheels for the guest, kept per
# requirement set and Python version; then flatpod's own wheel from the staged tree.
make_wheelhouse() {
  local pyver=$1 stage=$2 log=$3 pip key wheels deps
  pip=$(host_pip_for "$pyver") || return 77
  deps=$(python3 - "$repo/pyproject.toml" "$guest_test_requirements" <<'EOF2'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = set(sys.argv[2].split())
tests = [r for r in project["optional-dependencies"]["test"]
         if re.split(r"[<>=!~\[ ;]", r)[0] in wanted]
print("\n".join(project["dependencies"] + tests))
EOF2
)
  key=$( { echo "$pyver"; echo "$deps"; } | sha256sum | cut -c1-12)
  wheels=$vm_dir/wheels-$key
  if [ ! -f "$wheels/.complete" ]; then
    rm -rf "$wheels"; mkdir -p "$wheels"
    echo "$deps" > "$wheels/requirements.txt"
    "$pip" wheel -q -w "$wheels" -r "$wheels/requirements.txt" >>"$log" 2>&1 || return 1
    "$pip" download -q --no-deps -d "$wheels" pip >>"$log" 2>&1 || return 1  # the guest runs it
    touch "$wheels/.complete"
  fi
  # flatpod itself, from the working tree as it is (not only what is committed).
  "$pip" wheel -q --no-deps -w "$stage/dist" "$stage/src" >>"$log" 2>&1 || return 1
  echo "$wheels"
}

# The working tree (tracked and untracked, not ignored files) copied for the guest, so that
# nothing the guest writes (caches, builds) lands in the repository.
stage_tree() {
  local stage=$1
  mkdir -p "$stage/src" "$stage/dist"
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | (cd "$repo" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
    | tar -xf - -C "$stage/src"
}

selected_tests() {
  if [ $# -gt 0 ]; then printf '%s\n' "$@"; return; fi
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$repo/hack/vm-tests.txt"
}

# What --node-e2e brings into the guest: the harness, the binaries, crictl, the registry's port.
node_e2e_shares() {
  local harness=${NODE_E2E_HARNESS:-$tools/../node-e2e} bin=${NODE_E2E_BIN:-/var/tmp/flatpod-node-e2e/bin}
  local crictl=${CRICTL:-$(command -v crictl || true)} b
  [ -x "$harness/run.sh" ] || { echo "vm-test: no node e2e harness in $harness (NODE_E2E_HARNESS)" >&2; return 1; }
  for b in ginkgo e2e_node.test kubelet; do
    [ -x "$bin/$b" ] || { echo "vm-test: no $bin/$b (NODE_E2E_BIN)" >&2; return 1; }
  done
  [ -x "$crictl" ] || { echo "vm-test: no crictl (CRICTL)" >&2; return 1; }
  printf '%s\n' -s "$(realpath "$harness"):/mnt/node-e2e-harness" -s "$(realpath "$bin"):/mnt/node-e2e-bin" \
    -s "$(dirname "$(realpath "$crictl")"):/mnt/crictl" -f "${NODE_E2E_REGISTRY_PORT:-5000}"
}

summary_of() {  # pytest's last line: "== 20 passed, 2 skipped in 100.00s =="
  if [ -f "$1/node-e2e/runs/vm/summary.txt" ]; then
    sed '/^PASSED:/,$d' "$1/node-e2e/runs/vm/summary.txt"; return
  fi
  [ -f "$1/pytest.log" ] || { echo "no pytest output"; return; }
  tail -n 1 "$1/pytest.log" | sed -e 's/^=* *//' -e 's/ *=*$//'
}

main() {
  if [ "${1:-}" = --check ]; then
    preflight
    local missing; missing=$(missing_host_packages)
    echo "vm-test: can run${missing:+ (will install: ${missing//$'\n'/ })}"
    exit 0
  fi
  preflight
  local node_e2e=()
  if [ "${1:-}" = --node-e2e ]; then
    shift; [ $# -ge 1 ] || { echo "vm-test: --node-e2e needs a FOCUS"; exit 2; }
    node_e2e=("$@"); set --
  fi

  begin host-packages; install_host_packages; end host-packages

  local img; img=$(image_dir)
  begin "image ($img)"
  build_image "$img" || { echo "vm-test: FAILED: the image build failed (see $img.build/ or above)"; exit 1; }
  took[image]=$(( $(date +%s) - phase_start ))

  local pyver; pyver=$(guest_python_version "$img")
  [ -n "$pyver" ] || { echo "vm-test: FAILED: no python3 in the image ($img/packages.txt)"; exit 1; }

  local stage; stage=$(mktemp -d /tmp/flatpod-vm-stage.XXXXXX)
  # Expanded now: the trap runs when the script exits, after this function's locals are gone.
  # shellcheck disable=SC2064
  trap "rm -rf '$stage'" EXIT
  begin "wheels (guest Python $pyver)"
  stage_tree "$stage"
  local wheels rc=0
  wheels=$(make_wheelhouse "$pyver" "$stage" "$stage/pip.log") || rc=$?
  [ "$rc" = 77 ] && skip "no python$pyver on the host to build the guest's wheels with"
  if [ "$rc" != 0 ]; then
    tail -n 30 "$stage/pip.log"
    echo "vm-test: FAILED: could not make the guest's wheels (pip output above)"; exit 1
  fi
  local shares=(-s "$stage:/mnt/flatpod" -s "$wheels:/mnt/wheels")
  if [ ${#node_e2e[@]} -gt 0 ]; then
    : > "$stage/tests.txt"
    printf '%s\0' "${node_e2e[@]}" > "$stage/node-e2e.args"
    local extra; extra=$(node_e2e_shares) || exit 1
    mapfile -t -O "${#shares[@]}" shares <<< "$extra"
  else
    selected_tests "$@" > "$stage/tests.txt"
  fi
  if [ -n "${KUBELET:-}" ]; then
    [ -x "$KUBELET" ] || { echo "vm-test: FAILED: KUBELET=$KUBELET is not an executable"; exit 1; }
    shares+=(-s "$(dirname "$(realpath "$KUBELET")"):/mnt/kubelet")
    basename "$(realpath "$KUBELET")" > "$stage/kubelet-name"
  fi
  end wheels

  rm -rf "$out"; mkdir -p "$out"
  local what="$(wc -l < "$stage/tests.txt") test ids"
  [ ${#node_e2e[@]} -gt 0 ] && what="the node e2e focus '${node_e2e[0]}'"
  begin "boot + run $what in the VM (accel ${VM_ACCEL:-auto})"
  rc=0
  "$tools/runvm.sh" -i "$img" -A "${VM_ACCEL:-auto}" -m "${VM_MEM:-2048}" -c "${VM_CPUS:-2}" \
    -t "${VM_TIMEOUT:-1800}" "${shares[@]}" \
    "$repo/hack/vm-guest.sh" "$out" || rc=$?
  local vm_total=$(( $(date +%s) - phase_start ))
  # The guest's own phases (venv, tests) and the boot, from what runvm.sh and the guest wrote.
  local boot
  boot=$(awk '/^host_start_to_job_start_s:/ { printf "%d", $2 }' "$out/host-timing.txt" 2>/dev/null)
  [ -n "$boot" ] && took[boot]=$boot
  if [ -f "$out/phases.txt" ]; then
    while read -r name secs; do took[$name]=$secs; done < "$out/phases.txt"
  fi

  local total=$(( $(date +%s) - started )) result
  result="$(summary_of "$out")"
  echo "vm-test: phases:$(timings); VM ${vm_total}s; total ${total}s; results in $out"
  case $rc in
    0) echo "vm-test: PASSED: $result" ;;
    125) echo "vm-test: FAILED: no result came back from the VM (see $out/console.log)" ;;
    *) echo "vm-test: FAILED (exit $rc): $result"
       grep -E '^(FAILED|ERROR) ' "$out/pytest.log" 2>/dev/null | head -40 || true ;;
  esac
  [ "$rc" = 0 ] || exit 1
}

main "$@"
