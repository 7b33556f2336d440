# shellcheck shell=bash
# What hack/vm-test.sh and hack/vm-critest.sh share: can this machine run the VM, the host
# packages, the image (built once per guest package list), the staged working tree and the
# wheelhouse the guest installs flatpod from (the guest reaches no network). Sourced, not run.
# The sourcing script sets `repo` (the checkout) and `vm_name` (its name in messages) first.
# Env: VM_DIR (/var/tmp/flatpod-vm), VM_EXTRA_PACKAGES (more Debian packages for the image),
#      FLATPOD_VM_TOOLS (../shared/vm), FLATPOD_VENV (the host venv whose pip builds wheels).

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
host_packages=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs socat)
# What flatpod and its tests run with inside the guest (runc, iptables, iproute2 and
# busybox-static are in every image mkvm.sh builds). Changing this list builds a new image.
guest_packages="python3,python3-venv,crun,catatonit,nftables,conntrack"
guest_packages="$guest_packages,containernetworking-plugins,docker-registry,zstd,sqlite3,criu"
[ -n "${VM_EXTRA_PACKAGES:-}" ] && guest_packages="$guest_packages,$VM_EXTRA_PACKAGES"
# From the project's test extras, only what the VM tests import (no linters, no kubelet client,
# no hypothesis: fewer files to install under an emulated CPU).
guest_test_requirements="pytest"

# --- phases, each timed -------------------------------------------------------------------------
started=$(date +%s)
declare -A took=()
phase_start=0
begin() { phase_start=$(date +%s); echo "== $vm_name: $1"; }
end() { took[$1]=$(( $(date +%s) - phase_start )); }
timings() {  # timings PHASE...: " name Ns," for each phase that ran
  local p line=""
  for p in "$@"; do
    [ -n "${took[$p]:-}" ] && line="$line $p ${took[$p]}s,"
  done
  echo "${line%,}"
}
skip() { echo "$vm_name: SKIPPED: $*"; exit 77; }

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

check_only() {  # --check: say whether this machine can run the stage
  preflight
  local missing; missing=$(missing_host_packages)
  echo "$vm_name: can run${missing:+ (will install: ${missing//$'\n'/ })}"
}

install_host_packages() {
  local missing
  missing=$(missing_host_packages)
  [ -z "$missing" ] && return 0
  echo "$vm_name: installing ${missing//$'\n'/ }"
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

# Host packages, the image, the staged tree and the wheelhouse, each a timed phase. Sets img
# (the image dir), stage (a temporary dir removed on exit: src/, dist/) and wheels.
prepare_vm() {
  begin host-packages; install_host_packages; end host-packages

  img=$(image_dir)
  begin "image ($img)"
  build_image "$img" \
    || { echo "$vm_name: FAILED: the image build failed (see $img.build/ or above)"; exit 1; }
  end image

  local pyver; pyver=$(guest_python_version "$img")
  [ -n "$pyver" ] || { echo "$vm_name: FAILED: no python3 in the image ($img/packages.txt)"; exit 1; }

  stage=$(mktemp -d /tmp/flatpod-vm-stage.XXXXXX)
  # Expanded now: the trap runs when the script exits, maybe after the caller's locals are gone.
  # shellcheck disable=SC2064
  trap "rm -rf '$stage'" EXIT
  begin "wheels (guest Python $pyver)"
  stage_tree "$stage"
  local rc=0
  wheels=$(make_wheelhouse "$pyver" "$stage" "$stage/pip.log") || rc=$?
  [ "$rc" = 77 ] && skip "no python$pyver on the host to build the guest's wheels with"
  if [ "$rc" != 0 ]; then
    tail -n 30 "$stage/pip.log"
    echo "$vm_name: FAILED: could not make the guest's wheels (pip output above)"; exit 1
  fi
  end wheels
}

# The guest's own phases (venv, tests...) and the boot, from what runvm.sh and the guest wrote
# to OUT.
read_guest_timings() {
  local out=$1 boot name secs
  boot=$(awk '/^host_start_to_job_start_s:/ { printf "%d", $2 }' "$out/host-timing.txt" 2>/dev/null)
  [ -n "$boot" ] && took[boot]=$boot
  if [ -f "$out/phases.txt" ]; then
    while read -r name secs; do took[$name]=$secs; done < "$out/phases.txt"
  fi
  return 0
}
