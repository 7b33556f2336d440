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

begin tests
mapfile -t tests < "$share/tests.txt"
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
exit "$rc"
