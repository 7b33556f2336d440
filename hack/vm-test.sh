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
# The shared steps (image, wheelhouse, staged tree) are in hack/vm-lib.sh.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vm_name=vm-test
# shellcheck source=hack/vm-lib.sh
. "$repo/hack/vm-lib.sh"
out=${VM_OUT:-$vm_dir/out}

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
  if [ "${1:-}" = --check ]; then check_only; exit 0; fi
  preflight
  local node_e2e=()
  if [ "${1:-}" = --node-e2e ]; then
    shift; [ $# -ge 1 ] || { echo "vm-test: --node-e2e needs a FOCUS"; exit 2; }
    node_e2e=("$@"); set --
  fi

  prepare_vm
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

  rm -rf "$out"; mkdir -p "$out"
  local what="$(wc -l < "$stage/tests.txt") test ids"
  [ ${#node_e2e[@]} -gt 0 ] && what="the node e2e focus '${node_e2e[0]}'"
  begin "boot + run $what in the VM (accel ${VM_ACCEL:-auto})"
  local rc=0
  "$tools/runvm.sh" -i "$img" -A "${VM_ACCEL:-auto}" -m "${VM_MEM:-2048}" -c "${VM_CPUS:-2}" \
    -t "${VM_TIMEOUT:-1800}" "${shares[@]}" \
    "$repo/hack/vm-guest.sh" "$out" || rc=$?
  local vm_total=$(( $(date +%s) - phase_start ))
  read_guest_timings "$out"

  local total=$(( $(date +%s) - started )) result
  result="$(summary_of "$out")"
  echo "vm-test: phases:$(timings host-packages image wheels boot venv tests); VM ${vm_total}s; total ${total}s; results in $out"
  case $rc in
    0) echo "vm-test: PASSED: $result" ;;
    125) echo "vm-test: FAILED: no result came back from the VM (see $out/console.log)" ;;
    *) echo "vm-test: FAILED (exit $rc): $result"
       grep -E '^(FAILED|ERROR) ' "$out/pytest.log" 2>/dev/null | head -40 || true ;;
  esac
  [ "$rc" = 0 ] || exit 1
}

main "$@"
