#!/usr/bin/env bash
# Runs cri-tools' critest against flatpod with the offline harness in ../shared/conformance:
# starts `flatpod serve` with hack/conformance.toml, runs the suite, stops flatpod, and checks
# that nothing was left behind. Extra args go to run_critest.sh (e.g. --ginkgo.focus X).
#   PARALLEL=2 hack/critest.sh          OUT=dir keeps the results
#   hack/critest.sh --bench [ROUNDS]    `critest -benchmark` against flatpod, then containerd
#                                       (../shared/conformance/containerd.sh), ROUNDS times
#                                       (default 2), each round's same-run ratio table printed
#   BENCH_FOCUS=Image hack/critest.sh --bench 1   only the benchmarks whose names match
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

# Benchmark mode: flatpod and containerd back to back in each round, so that every ratio
# compares two runs made under the same machine load (printed with each round).
bench() {
  local rounds=${1:-2} out=${OUT:-/var/tmp/flatpod-conformance/results/bench-pair-$(date -u +%Y%m%dT%H%M%SZ)}
  "$conformance/containerd.sh" start >/dev/null
  trap '"$conformance/containerd.sh" stop >/dev/null 2>&1 || true; cleanup' EXIT
  local ctrd_socket focus=()
  if [ -n "${BENCH_FOCUS:-}" ]; then focus=(--ginkgo.focus "$BENCH_FOCUS"); fi
  ctrd_socket=$("$conformance/containerd.sh" socket)
  for round in $(seq "$rounds"); do
    echo "== round $round: load average $(cut -d' ' -f1-3 /proc/loadavg)"
    OUT=$out/$round/flatpod "$conformance/run_bench.sh" "unix://$socket" "${focus[@]}" >/dev/null
    crictl --runtime-endpoint "unix://$socket" rmp -fa >/dev/null 2>&1 || true
    OUT=$out/$round/containerd "$conformance/run_bench.sh" "$ctrd_socket" "${focus[@]}" >/dev/null
    echo "   flatpod = A, containerd = B; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
    python3 "$conformance/compare_bench.py" "$out/$round/flatpod" "$out/$round/containerd" || true
  done
  echo "results: $out"
}

status=0
if [ "${1:-}" = "--bench" ]; then
  shift
  bench "$@" || status=$?
  exit $status
fi
"$conformance/run_critest.sh" "unix://$socket" "$@" || status=$?

# Whatever critest left (it removes its own pods; a failed spec may not), then flatpod.
crictl --runtime-endpoint "unix://$socket" rmp -fa >/dev/null 2>&1 || true
exit $status
