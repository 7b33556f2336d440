# shellcheck shell=bash
# What the VM jobs (hack/vm-guest.sh, hack/vm-critest-guest.sh) share inside the guest: timed
# phases and the venv made from the wheelhouse (no network here). Sourced from the staged tree
# at /mnt/flatpod/src, with flatpod's wheel at /mnt/flatpod/dist and the wheelhouse at /mnt/wheels.

share=/mnt/flatpod
out=/job/out
venv=/opt/flatpod/venv
phase_start=0
begin() { phase_start=$(date +%s); echo "== guest: $1"; }
end() { echo "$1 $(( $(date +%s) - phase_start ))" >> "$out/phases.txt"; }

describe_guest() {
  echo "== guest: pid 1 $(cat /proc/1/comm), $(stat -fc %T /sys/fs/cgroup)," \
    "kernel $(uname -r), $(python3 --version)"
  echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
}

# The venv, flatpod's wheel in it and /usr/local/bin/flatpod. Every CPU cycle is emulated: no
# ensurepip (pip runs from its wheel in the wheelhouse) and no byte-compiling of everything
# installed (Python compiles what runs, once).
install_flatpod() {
  begin venv
  python3 -m venv --without-pip "$venv" || return 1
  local pip_wheel
  pip_wheel=$(ls /mnt/wheels/pip-*.whl | tail -n 1)
  "$venv/bin/python" "$pip_wheel/pip" install -q --no-compile --no-index --find-links /mnt/wheels \
    -r /mnt/wheels/requirements.txt "$share"/dist/flatpod-*.whl || return 1
  ln -sf "$venv/bin/flatpod" /usr/local/bin/flatpod
  end venv
  "$venv/bin/flatpod" --version
}
