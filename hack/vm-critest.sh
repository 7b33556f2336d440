#!/usr/bin/env bash
# Runs cri-tools' critest v1.36.0 against flatpod inside the systemd + pure cgroup v2 VM (the
# image, wheelhouse and staged tree of hack/vm-test.sh, shared in hack/vm-lib.sh), for each
# combination of cgroup driver and runtime handler, one after another in one boot.
#
#   sudo hack/vm-critest.sh                           all four: systemd-runc systemd-crun
#                                                     cgroupfs-runc cgroupfs-crun
#   sudo hack/vm-critest.sh systemd-runc              only these combinations
#   sudo hack/vm-critest.sh cgroupfs-crun -- --ginkgo.focus Streaming    extra critest args
#
# Inside, flatpod runs as hack/flatpod.service with /etc/flatpod/config.toml naming the driver
# (cgroup_driver), the crun handler ([runtimes.crun]) and the registry mirrors; crun pods get
# it from critest's -runtime-handler, as from a RuntimeClass. Images come from the host's
# conformance registry (../shared/conformance: registry.sh, build_images.py, started and
# pushed here when needed), which the guest reaches as 10.0.2.100:5000 (runvm.sh -f 5000).
# critest, ginkgo and crictl are taken from $CRI_TOOLS_BIN or PATH (never committed).
#
# Exit: 0 every combination passed, 1 a failure, 77 skipped (no critest, cannot run a VM).
# Results: $VM_OUT ($VM_DIR/out-critest): <combination>/{junit.xml,critest.log,flatpod.log,
# summary.txt}, summary.txt (one line per combination), journal.txt, console.log.
# Env: as hack/vm-test.sh (VM_DIR, VM_ACCEL, VM_MEM, VM_CPUS: 1 here), PARALLEL (critest
#      -parallel, 1), TIMEOUT (minutes per combination, 120), CONFORMANCE_DIR.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vm_name=vm-critest
# shellcheck source=hack/vm-lib.sh
. "$repo/hack/vm-lib.sh"
out=${VM_OUT:-$vm_dir/out-critest}
# critest's AppArmor specs load their profiles with `sudo apparmor_parser` where the kernel has
# AppArmor enabled (Debian's does, as most nodes'): an image of its own with both.
guest_packages="$guest_packages,apparmor,sudo"
conformance=${CONFORMANCE_DIR:-$(dirname "$tools")/conformance}
all_combinations="systemd-runc systemd-crun cgroupfs-runc cgroupfs-crun"

# The directory holding critest (and ginkgo, crictl when there), or nothing.
cri_tools_dir() {
  local critest
  critest=$(PATH=${CRI_TOOLS_BIN:+$CRI_TOOLS_BIN:}$PATH command -v critest) || return 1
  dirname "$(readlink -f "$critest")"
}

combinations=()
critest_args=()
parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --) shift; critest_args=("$@"); return ;;
      systemd-runc|systemd-crun|cgroupfs-runc|cgroupfs-crun) combinations+=("$1") ;;
      *) echo "$vm_name: unknown argument '$1' (combinations: $all_combinations; -- then critest args)" >&2
         exit 2 ;;
    esac
    shift
  done
}

# The conformance registry on the host, with every stand-in image pushed (a rerun pushes
# nothing).
prepare_registry() {
  [ -x "$conformance/registry.sh" ] || skip "no conformance harness in $conformance (CONFORMANCE_DIR)"
  "$conformance/registry.sh" status >/dev/null 2>&1 || "$conformance/registry.sh" start
  python3 "$conformance/build_images.py" >"$stage/build_images.log" 2>&1 \
    || { tail -n 20 "$stage/build_images.log"; echo "$vm_name: FAILED: build_images.py"; exit 1; }
}

write_job_env() {
  {
    echo "COMBOS='${combinations[*]}'"
    echo "PARALLEL=${PARALLEL:-1}"
    echo "TIMEOUT=${TIMEOUT:-120}"
    printf 'CRITEST_ARGS=('; printf '%q ' "${critest_args[@]}"; echo ')'
  } > "$stage/critest.env"
}

summarize() {
  local combo dir line
  : > "$out/summary.txt"
  for combo in "${combinations[@]}"; do
    dir=$out/$combo
    if [ -f "$dir/junit.xml" ]; then
      python3 "$conformance/summarize_junit.py" "$dir/junit.xml" > "$dir/summary.txt" 2>&1 || true
      # "passed N, failed N, skipped N (at runtime ..., excluded ...)" from its summary
      line=$(awk '/^  (passed|failed|skipped):/ { sub(/^ +/, ""); printf "%s%s", sep, $0; sep = ", " }' \
        "$dir/summary.txt" | sed 's/:  */ /g')
    else
      line="no junit report (see $dir/critest.log)"
    fi
    echo "$combo: $line, $(cat "$dir/seconds" 2>/dev/null || echo '?')s" | tee -a "$out/summary.txt"
  done
}

main() {
  if [ "${1:-}" = --check ]; then check_only; exit 0; fi
  parse_args "$@"
  # shellcheck disable=SC2206 # one word per combination
  [ ${#combinations[@]} -gt 0 ] || combinations=($all_combinations)
  preflight
  local tools_bin
  tools_bin=$(cri_tools_dir) || skip "no critest on PATH or in \$CRI_TOOLS_BIN (build cri-tools v1.36.0; never commit it)"
  [ "${PARALLEL:-1}" -le 1 ] || [ -x "$tools_bin/ginkgo" ] || skip "PARALLEL needs ginkgo next to critest in $tools_bin"
  prepare_vm
  begin registry; prepare_registry; end registry
  write_job_env

  rm -rf "$out"; mkdir -p "$out"
  begin "boot + critest ${combinations[*]} in the VM (accel ${VM_ACCEL:-auto})"
  local rc=0 job_timeout=$(( ${#combinations[@]} * (${TIMEOUT:-120} + 10) * 60 + 900 ))
  "$tools/runvm.sh" -i "$img" -A "${VM_ACCEL:-auto}" -m "${VM_MEM:-2048}" -c "${VM_CPUS:-1}" \
    -t "$job_timeout" -f 5000 -s "$stage:/mnt/flatpod" -s "$wheels:/mnt/wheels" \
    -s "$tools_bin:/mnt/critools" "$repo/hack/vm-critest-guest.sh" "$out" || rc=$?
  local vm_total=$(( $(date +%s) - phase_start ))
  read_guest_timings "$out"
  local total=$(( $(date +%s) - started ))
  # shellcheck disable=SC2086
  echo "$vm_name: phases:$(timings host-packages image wheels registry boot venv ${combinations[*]}); VM ${vm_total}s; total ${total}s; results in $out"
  summarize
  case $rc in
    0) echo "$vm_name: PASSED" ;;
    125) echo "$vm_name: FAILED: no result came back from the VM (see $out/console.log)" ;;
    *) echo "$vm_name: FAILED (exit $rc)"
       sed -n '/^FAILED:/,/^[=-]\{20,\}$/p' "$out"/*/summary.txt 2>/dev/null | head -80 || true ;;
  esac
  [ "$rc" = 0 ] || exit 1
}

main "$@"
