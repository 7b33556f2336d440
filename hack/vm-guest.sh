#!/usr/bin/env bash
# Runs inside the VM as the job of hack/vm-test.sh (via ../shared/vm/runvm.sh), as root, with
# the staged tree and flatpod's wheel at /mnt/flatpod and the wheelhouse at /mnt/wheels.
# Makes the venv from the wheelhouse (no network here), installs flatpod, runs the listed
# tests; writes pytest.log, junit.xml and phases.txt (seconds per phase) to /job/out.
set -uo pipefail
# shellcheck source=hack/vm-guest-lib.sh
. /mnt/flatpod/src/hack/vm-guest-lib.sh

describe_guest
install_flatpod || exit 1

# A kubelet binary from the host (KUBELET=... hack/vm-test.sh), on the guest's own disk.
if [ -f "$share/kubelet-name" ]; then
  install -m 0755 "/mnt/kubelet/$(cat "$share/kubelet-name")" /usr/local/bin/kubelet || exit 1
  export KUBELET=/usr/local/bin/kubelet
  echo "kubelet: $("$KUBELET" --version)"
fi

# hack/vm-test.sh --node-e2e: Kubernetes' node e2e suite instead of pytest.
if [ -f "$share/node-e2e.args" ]; then
  mapfile -d '' -t args < "$share/node-e2e.args"
  bash "$share/src/hack/vm-node-e2e.sh" "${args[@]}"
  exit $?
fi

# The tests' own logs (daemon, kubelet) from pytest's temp dirs to $out/logs: once a minute
# while the tests run (a hung test shows where it hangs), and once after.
copy_test_logs() {
  find /tmp/pytest-of-root -name '*.log' -size -20M 2>/dev/null | while read -r log; do
    mkdir -p "$out/logs/$(dirname "${log#/tmp/pytest-of-root/}")"
    cp "$log" "$out/logs/${log#/tmp/pytest-of-root/}"
  done
  # flatpod run as a unit by the tests (test_systemd_unit, test_kubelet) logs to the journal.
  journalctl --no-pager -q -u 'flatpod-test-*' > "$out/logs/flatpod-test-units.txt" 2>/dev/null
}

begin tests
mapfile -t tests < "$share/tests.txt"
( while sleep 60; do copy_test_logs; done ) &
log_copier=$!
cd "$share/src" || exit 1
# The tests import the staged tree; bytecode goes to the guest's disk, not the share.
export PYTHONPATH=$share/src PYTHONPYCACHEPREFIX=/var/cache/flatpod-pycache
# An emulated CPU (qemu TCG, "qemu" here; "kvm" with hardware virtualization) stretches the
# tests' waits tenfold.
virt=$(systemd-detect-virt 2>/dev/null || true)
[ "$virt" = qemu ] && export FLATPOD_TEST_TIME_SCALE=${FLATPOD_TEST_TIME_SCALE:-10}
echo "virtualization: $virt, FLATPOD_TEST_TIME_SCALE=${FLATPOD_TEST_TIME_SCALE:-1}"
"$venv/bin/python" -m pytest -p no:cacheprovider -rfEs --junitxml="$out/junit.xml" \
  "${tests[@]}" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
end tests
kill "$log_copier" 2>/dev/null
copy_test_logs
exit "$rc"
