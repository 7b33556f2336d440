#!/usr/bin/env bash
# Runs cri-tools' critest against flatpod with the offline harness in ../shared/conformance:
# starts `flatpod serve` with hack/conformance.toml, runs the suite, stops flatpod, and checks
# that nothing was left behind. Extra args go to run_critest.sh (e.g. --ginkgo.focus X).
#   PARALLEL=2 hack/critest.sh          OUT=dir keeps the results
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
conformance=${CONFORMANCE_DIR:-$repo/../shared/conformance}
venv=${FLATPOD_VENV:-/opt/flatpod/venv}
config=$repo/hack/conformance.toml
socket=/run/flatpod-conformance/flatpod.sock
log=${FLATPOD_LOG:-/var/tmp/flatpod-conformance.log}

"$conformance/registry.sh" status >/dev/null 2>&1 || "$conformance/registry.sh" start
python3 "$conformance/build_images.py" >/dev/null

# flatpod starts ksmd if it is stopped (shim_page_merging = "on"): put it back afterwards.
ksm_run=/sys/kernel/mm/ksm/run
ksm_before=$(cat "$ksm_run" 2>/dev/null || true)

PYTHONPATH=$repo "$venv/bin/python" -m sandbox serve --config "$config" >"$log" 2>&1 &
daemon=$!

# After the run: flatpod stopped, then what a node would keep but a test run should not: the
# bridge, its masquerade rule, the pods' parent cgroup and a ksmd it started.
cleanup() {
  kill -TERM "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null || true
  if [ "$ksm_before" = 0 ]; then echo 0 >"$ksm_run"; fi
  PYTHONPATH=$repo "$venv/bin/python" - <<'PY' || true
import tempfile
from pathlib import Path
from netns.bridge import BridgeConfig, BridgeNetwork
from netns.ipam import JsonFileLeaseBook
from sandbox import cgroups
from sandbox.config import load_config
config = load_config(Path("hack/conformance.toml"))
with tempfile.TemporaryDirectory() as tmp:
    book = JsonFileLeaseBook(Path(tmp) / "leases.json")
    BridgeNetwork(BridgeConfig(name=config.network.bridge, subnet=config.network.subnet), book).destroy()
cgroups.remove(config.default_cgroup_parent)
PY
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done

status=0
"$conformance/run_critest.sh" "unix://$socket" "$@" || status=$?

# Whatever critest left (it removes its own pods; a failed spec may not), then flatpod.
crictl --runtime-endpoint "unix://$socket" rmp -fa >/dev/null 2>&1 || true
exit $status
