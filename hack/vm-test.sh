#!/usr/bin/env bash
# Runs the systemd + cgroup v2 tests (hack/vm-tests.txt) inside a throwaway Debian 12 VM with
# systemd as PID 1 and the pure cgroup v2 hierarchy, booted by ../shared/vm (mkvm.sh, runvm.sh).
#
#   sudo hack/vm-test.sh                      the tests listed in hack/vm-tests.txt
#   sudo hack/vm-test.sh tests/test_x.py ...  these pytest node ids instead
#   sudo hack/vm-test.sh --check              only says whether this machine can run the stage
#
# Steps, each timed: host packages (qemu, mmdebstrap...; apt-get when missing), the VM image
# (built once per package list, kept in $VM_DIR), a wheelhouse for the guest's Python made on
# the host (the guest reaches no network), then boot, a venv from the wheelhouse, flatpod
# installed in it, pytest. Results: $VM_OUT (junit.xml, pytest.log, journal.txt, phases.txt).
#
# Exit: 0 passed, 1 failed, 77 skipped (this machine cannot run a VM: no qemu, not root...).
# Env: VM_DIR (/var/tmp/flatpod-vm), VM_OUT ($VM_DIR/out), VM_EXTRA_PACKAGES (more Debian
#      packages for the image), VM_ACCEL (auto|kvm|tcg), VM_MEM (MiB, 2048), VM_CPUS (2),
#      VM_TIMEOUT (seconds for the job inside, 1800), FLATPOD_VM_TOOLS (../shared/vm).
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

summary_of() {  # pytest's last line: "== 20 passed, 2 skipped in 100.00s =="
  [ -f "$1/pytest.log" ] || { echo "no pytest output"; return; }
  tail -n 1 "$1/pytest.log" | sed -e 's/^=* *//' -e 's/ *=*$//'
}

main() {
  if [ "${1:-}" = --check ]; then check_only; exit 0; fi
  preflight
  prepare_vm
  selected_tests "$@" > "$stage/tests.txt"

  rm -rf "$out"; mkdir -p "$out"
  begin "boot + run $(wc -l < "$stage/tests.txt") test ids in the VM (accel ${VM_ACCEL:-auto})"
  local rc=0
  "$tools/runvm.sh" -i "$img" -A "${VM_ACCEL:-auto}" -m "${VM_MEM:-2048}" -c "${VM_CPUS:-2}" \
    -t "${VM_TIMEOUT:-1800}" -s "$stage:/mnt/flatpod" -s "$wheels:/mnt/wheels" \
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
