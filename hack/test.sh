#!/usr/bin/env bash
# Installs the test dependencies and runs the whole suite: lint, types, then the tests against
# the real kernel, runc, registry and namespaces, then the systemd + cgroup v2 tests in a VM
# (hack/vm-test.sh; FLATPOD_VM_TESTS=0 leaves them out). Run as root. Extra args go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLATPOD_VENV:-/opt/flatpod/venv}
"$repo/hack/setup.sh" --test
cd "$repo"
export PYTHONPATH="$repo"

echo "== ruff"
"$venv/bin/ruff" check .
echo "== mypy --strict"
"$venv/bin/mypy" --strict
echo "== pytest"
host_rc=0
"$venv/bin/python" -m pytest -p no:cacheprovider "$@" || host_rc=$?

vm_rc=0
vm_result="skipped (FLATPOD_VM_TESTS=${FLATPOD_VM_TESTS:-})"
case "${FLATPOD_VM_TESTS:-1}" in
  0|no|off|false) ;;
  *)
    echo "== systemd + cgroup v2 VM (hack/vm-test.sh)"
    "$repo/hack/vm-test.sh" || vm_rc=$?
    case $vm_rc in
      0) vm_result="passed" ;;
      77) vm_result="skipped: this machine cannot run the VM (see above)"; vm_rc=0 ;;
      *) vm_result="FAILED" ;;
    esac ;;
esac

echo "== host suite: $([ "$host_rc" = 0 ] && echo passed || echo "FAILED (pytest exit $host_rc)")"
echo "== VM suite: $vm_result"
[ "$host_rc" = 0 ] && [ "$vm_rc" = 0 ]
