#!/usr/bin/env bash
# Runs inside the VM (hack/vm-test.sh --node-e2e, after hack/vm-guest.sh made the venv): the
# Kubernetes node e2e suite (../shared/node-e2e) against flatpod on a systemd + cgroup v2 node.
# flatpod runs as a node's does: hack/flatpod.service as /etc/systemd/system/flatpod.service,
# /etc/flatpod/config.toml from the harness's flatpod.toml.in, the systemd cgroup driver.
# kubelet runs as the framework starts it where systemd is PID 1: a transient unit
# (systemd-run), with `cgroupDriver: systemd` and flatpod's unit as its runtime cgroup.
#
# Shares (vm-test.sh): /mnt/flatpod (staged tree), /mnt/node-e2e-harness, /mnt/node-e2e-bin
# (ginkgo, e2e_node.test, kubelet), /mnt/crictl; the host's registry (stand-in images) is
# 10.0.2.100:5000. Arguments: FOCUS [SKIP [e2e_node.test flags...]].
# Results in /job/out/node-e2e/: runs/vm, run.sh's run dir (junit.xml, ginkgo.log, kubelet.log,
# summary.txt...), written there as the run goes; flatpod's config and journal.
set -uo pipefail

focus=${1:?usage: vm-node-e2e.sh FOCUS [SKIP [flags...]]}
skip=${2:-'\[Flaky\]'}
shift $(($# < 2 ? $# : 2))
share=/mnt/flatpod
out=/job/out
work=/var/tmp/flatpod-node-e2e
harness=/opt/node-e2e-harness
phase_start=0
begin() { phase_start=$(date +%s); echo "== vm-node-e2e: $1"; }
end() { echo "$1 $(( $(date +%s) - phase_start ))" >> "$out/phases.txt"; }

begin node-e2e-setup
# The framework's apiserver advertises the address of the interface with the default route,
# IPv4 first. qemu's restricted user net leases 10.0.2.15 without a router, so the IPv6 one
# (fec0::..., from its router advertisement) was taken, and the IPv4 service range refused it.
# A default route to qemu's gateway: it forwards nothing out (restrict=on).
if [ -z "$(ip -4 route show default)" ]; then
  dev=$(ip -4 -o addr show scope global | awk '{ print $2; exit }')
  [ -n "$dev" ] && ip route add default via 10.0.2.2 dev "$dev"
fi
mkdir -p "$work/bin" "$work/logs" "$out/node-e2e"
for b in ginkgo e2e_node.test kubelet; do
  install -m 0755 "/mnt/node-e2e-bin/$b" "$work/bin/$b" || exit 1
done
install -m 0755 /mnt/crictl/crictl /usr/local/bin/crictl || exit 1
cp -r /mnt/node-e2e-harness "$harness" || exit 1
# The harness's kubelet base config, with the node's driver (kubelet asks flatpod too).
sed -i 's/^cgroupDriver: cgroupfs$/cgroupDriver: systemd/' "$harness/kubelet-config.yaml"
grep -q '^cgroupDriver: systemd$' "$harness/kubelet-config.yaml" || exit 1

# flatpod's config from the harness's template: flatpod's default state dir and socket, the
# host's registry as the mirror; no cgroup parent of its own (systemd driver: kubelet's slices).
mkdir -p /etc/flatpod
sed -e "s|@FLATPOD_ROOT@|/var/lib/flatpod|g" -e "s|@FLATPOD_STATE@|/run/flatpod|g" \
    -e "s|@NODE_E2E_REGISTRY@|10.0.2.100:5000|g" -e "s|@NODE_E2E_WORK@|$work|g" \
    -e "s|@FLATPOD_BRIDGE@|fpnode0|g" -e "s|@FLATPOD_SUBNET@|10.240.0.0/16|g" \
    -e "s|@RUNTIME_HANDLER@|test-handler|g" -e '/^default_cgroup_parent/d' \
    "$harness/flatpod.toml.in" > /etc/flatpod/config.toml
mkdir -p "$work/no-cni"
echo 'cgroup_driver = "systemd"' | cat - /etc/flatpod/config.toml > /etc/flatpod/config.toml.new
mv /etc/flatpod/config.toml.new /etc/flatpod/config.toml
cp /etc/flatpod/config.toml "$out/node-e2e/flatpod.toml"
install -m 0644 "$share/src/hack/flatpod.service" /etc/systemd/system/flatpod.service
systemctl daemon-reload && systemctl enable --now flatpod || exit 1
# Under an emulated CPU the first start (shim zygote) can take a restart or two.
for _ in $(seq 300); do
  crictl -r unix:///run/flatpod/flatpod.sock version > /dev/null 2>&1 && break
  sleep 1
done
crictl -r unix:///run/flatpod/flatpod.sock version || { journalctl -u flatpod --no-pager | tail -30; exit 1; }
end node-e2e-setup

begin node-e2e
# The run's dir on the share, so that ginkgo's and kubelet's logs can be followed from the
# host while it runs (under an emulated CPU a run takes long).
mkdir -p "$out/node-e2e/runs"
ln -sfn "$out/node-e2e/runs" "$work/runs"
# kubelet's runtime cgroup is flatpod's unit: the Summary API spec's "runtime" system container
# (upstream CI passes containerd's or CRI-O's unit the same way). Under an emulated CPU the
# framework's apiserver took more than its default 2 min to answer /healthz.
NODE_E2E_WORK=$work CRICTL=crictl FLATPOD_STATE=/run/flatpod \
  "$harness/run.sh" vm 1 "$focus" "$skip" \
  --kubelet-flags=--runtime-cgroups=/system.slice/flatpod.service \
  --server-start-timeout="${NODE_E2E_SERVER_START_TIMEOUT:-20m}" "$@"
rc=$?
end node-e2e
journalctl -u flatpod --no-pager > "$out/node-e2e/flatpod.journal.txt" 2>&1
systemctl stop flatpod
exit "$rc"
