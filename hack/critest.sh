#!/usr/bin/env bash
# Runs cri-tools' critest against flatpod with the offline harness in ../shared/conformance:
# starts `flatpod serve` with hack/conformance.toml, runs the suite, stops flatpod, and checks
# that nothing was left behind. Extra args go to run_critest.sh (e.g. --ginkgo.focus X).
#   PARALLEL=2 hack/critest.sh          OUT=dir keeps the results
#   hack/critest.sh --bench [ROUNDS]    `critest -benchmark` against flatpod, then containerd
#                                       (../shared/conformance/containerd.sh), ROUNDS times
#                                       (default 2), each round's same-run ratio table printed;
#                                       first an untimed warm-up of both (see warm_up)
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

# Before round 1, both daemons just started: an untimed critest -benchmark of 2 samples per
# figure against each (the same calls, images and focus; results kept, never compared), so
# that no round pays for a first call's lazy work (modules imported at first use, the bridge,
# the image store's first reads, runc and the images in the page cache). Then flatpod is
# ready for work once its spare shim (forked after each RunPodSandbox, sandbox/shims.py) is
# up: the spare's marker holds the shim's pid.
warm_up() {
  local out=$1 ctrd_socket=$2; shift 2
  local params=$out/params.yaml
  mkdir -p "$out"
  sed -E 's/^(containersNumber|podsNumber|imagesNumber): .*/\1: 2/' \
    "$conformance/bench-params.yaml" >"$params"
  echo "== warm-up (untimed, 2 samples per figure): load average $(cut -d' ' -f1-3 /proc/loadavg)"
  PARAMS=$params OUT=$out/flatpod "$conformance/run_bench.sh" "unix://$socket" "$@" >/dev/null || true
  crictl --runtime-endpoint "unix://$socket" rmp -fa >/dev/null 2>&1 || true
  PARAMS=$params OUT=$out/containerd "$conformance/run_bench.sh" "$ctrd_socket" "$@" >/dev/null || true
  local state_dir spare=""
  state_dir=$(dirname "$socket")
  for _ in $(seq 100); do
    spare=$(grep -lvx 0 "$state_dir"/pods/*/spare 2>/dev/null | head -1)
    [ -n "$spare" ] && break
    sleep 0.1
  done
  echo "   flatpod's spare shim: ${spare:-not up after 10 s}"
}

image_count() {
  crictl --runtime-endpoint "$1" images -q 2>/dev/null | wc -l
}

# Benchmark mode: flatpod and containerd back to back in each round, so that every ratio
# compares two runs made under the same machine load (printed with each round).
bench() {
  local rounds=${1:-2} out=${OUT:-/var/tmp/flatpod-conformance/results/bench-pair-$(date -u +%Y%m%dT%H%M%SZ)}
  "$conformance/containerd.sh" start >/dev/null
  trap '"$conformance/containerd.sh" stop >/dev/null 2>&1 || true; cleanup' EXIT
  local ctrd_socket focus=()
  if [ -n "${BENCH_FOCUS:-}" ]; then focus=(--ginkgo.focus "$BENCH_FOCUS"); fi
  ctrd_socket=$("$conformance/containerd.sh" socket)
  # ListImages returns every image a runtime holds: a conformance run leaves flatpod's store
  # with its images (6 here) and containerd's with 2, which tripled flatpod's answer. Both
  # start from no unused image; the benchmark pulls what it needs (containerd also its pause).
  crictl --runtime-endpoint "unix://$socket" rmi --prune >/dev/null 2>&1 || true
  crictl --runtime-endpoint "$ctrd_socket" rmi --prune >/dev/null 2>&1 || true
  warm_up "$out/warm-up" "$ctrd_socket" "${focus[@]}"
  for round in $(seq "$rounds"); do
    echo "== round $round: load average $(cut -d' ' -f1-3 /proc/loadavg); images listed:" \
      "flatpod $(image_count "unix://$socket"), containerd $(image_count "$ctrd_socket")"
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
