#!/usr/bin/env bash
# Runs inside the VM as the job of hack/vm-critest.sh (via ../shared/vm/runvm.sh), as root:
# the staged tree and flatpod's wheel at /mnt/flatpod, the wheelhouse at /mnt/wheels, critest
# (+ ginkgo, crictl) at /mnt/critools, the host's conformance registry at 10.0.2.100:5000.
# Installs flatpod and its unit (hack/flatpod.service), then for each combination in
# /mnt/flatpod/critest.env (DRIVER-HANDLER) writes /etc/flatpod/config.toml, (re)starts the
# unit, runs critest and removes what it left; results in /job/out/<combination>/ (junit.xml,
# report.json, critest.log, flatpod.log, seconds) and phases.txt.
set -uo pipefail
# shellcheck source=hack/vm-guest-lib.sh
. /mnt/flatpod/src/hack/vm-guest-lib.sh
# COMBOS ("systemd-runc cgroupfs-crun"...), PARALLEL, TIMEOUT (minutes per combination),
# CRITEST_ARGS (an array: extra critest/ginkgo arguments).
# shellcheck source=/dev/null
. "$share/critest.env"
export PATH=/mnt/critools:$PATH
socket=/run/flatpod/flatpod.sock
registry=http://10.0.2.100:5000

describe_guest
install_flatpod || exit 1
timeout 10 bash -c ': </dev/tcp/10.0.2.100/5000' 2>/dev/null \
  || echo "WARNING: the conformance registry is not reachable at $registry (runvm.sh -f 5000)"
install -m 0644 "$share/src/hack/flatpod.service" /etc/systemd/system/flatpod.service
systemctl daemon-reload
mkdir -p /etc/flatpod

# The node's config for one combination: the driver, the crun handler beside the built-in
# runc, and the registries critest pulls from mirrored to the conformance registry. The pods
# take the handler from critest's -runtime-handler (as from a RuntimeClass); the default stays
# runc.
write_config() {
  local driver=$1
  cat > /etc/flatpod/config.toml <<TOML
cgroup_driver = "$driver"
log_level = "info"

[runtimes.crun]
runtime_path = "/usr/bin/crun"

[images.mirrors]
"registry.k8s.io" = ["$registry"]
"k8s.gcr.io" = ["$registry"]
"gcr.io" = ["$registry"]
"public.ecr.aws" = ["$registry"]

[network]
cni_conf_dir = "/etc/flatpod/no-cni"
TOML
}

wait_for_socket() {
  local _
  for _ in $(seq 600); do [ -S "$socket" ] && return 0; sleep 0.2; done
  return 1
}

run_combination() {
  local combo=$1 driver=${1%-*} handler=${1#*-} dir=$out/$1 since rc=0 args
  mkdir -p "$dir"
  write_config "$driver"
  since=$(date '+%Y-%m-%d %H:%M:%S')
  systemctl restart flatpod
  wait_for_socket || { echo "$combo: flatpod did not start"; systemctl status flatpod; return 1; }
  args=(--runtime-endpoint "unix://$socket" --image-endpoint "unix://$socket"
        --ginkgo.skip 'with digest'
        --ginkgo.junit-report "$dir/junit.xml" --ginkgo.json-report "$dir/report.json"
        --ginkgo.timeout "${TIMEOUT}m" --ginkgo.no-color --ginkgo.v)
  [ "$handler" != runc ] && args+=(-runtime-handler "$handler")
  [ "$PARALLEL" -gt 1 ] && args+=(-parallel "$PARALLEL")
  echo "== guest: critest $combo (driver $driver, handler $handler, parallel $PARALLEL)"
  echo "+ critest ${args[*]} ${CRITEST_ARGS[*]}" > "$dir/critest.log"
  local start; start=$(date +%s)
  # cwd = $dir: critest's fallback config is <parent of cwd>/crictl.yaml; keep it predictable
  ( cd "$dir" && timeout --kill-after=60 "$((TIMEOUT + 5))m" critest "${args[@]}" "${CRITEST_ARGS[@]}" ) \
    >> "$dir/critest.log" 2>&1 || rc=$?
  echo "$(( $(date +%s) - start ))" > "$dir/seconds"
  echo "$rc" > "$dir/rc"
  grep -E '^(Ran |FAIL!|SUCCESS!)' "$dir/critest.log" || tail -n 5 "$dir/critest.log"
  # Whatever critest left (it removes its own pods; a failed spec may not), then flatpod.
  crictl --runtime-endpoint "unix://$socket" rmp -fa >/dev/null 2>&1 || true
  crictl --runtime-endpoint "unix://$socket" pods -q > "$dir/pods-left.txt" 2>/dev/null || true
  systemctl stop flatpod
  journalctl -u flatpod --since "$since" --no-pager > "$dir/flatpod.log" 2>&1 || true
  return "$rc"
}

status=0
for combo in $COMBOS; do
  begin "$combo"
  run_combination "$combo" || status=1
  end "$combo"
done
exit "$status"
