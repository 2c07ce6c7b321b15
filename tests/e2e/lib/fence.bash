# The fence around a real systemd user manager, shared by tests/e2e/systemd.sh and upgrade.sh.
# Sourced by a script already inside its own mount and PID namespace (unshare --mount --pid
# --fork --mount-proc --kill-child), so that everything dies with it. (Not a test itself: no
# .sh suffix, so .ci/run's loop over tests/e2e/*.sh leaves it alone.)
#
#   fence_cgroups NAME      sets `cgroups` to this fence's cgroup in each mounted hierarchy
#   fence_enter             /run/systemd a private tmpfs (no system manager to talk to), the
#                           console masked (a manager started as root writes to it), the cgroups made
#   fence_start_manager HOME RUNTIME
#                           the user manager, in those cgroups, with nothing but an empty target
#                           started by default; sets `manager` to its PID
#   fence_leave UNIT...     stops the units and the manager, kills whatever is left in the
#                           cgroups, removes them, undoes the mounts (for an EXIT trap: never fails)

cgroups=()
manager=""

fence_cgroups() {
  cgroups=()
  local hierarchy
  for hierarchy in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
    [ -d "$hierarchy" ] && cgroups+=("$hierarchy/$1")
  done
  if [ ${#cgroups[@]} -eq 0 ] && [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cgroups+=("/sys/fs/cgroup/$1")
  fi
}

fence_enter() {
  mkdir -p /run/systemd
  mount -t tmpfs tmpfs /run/systemd
  mkdir -p /run/systemd/system
  mount --bind /dev/null /dev/console
  local cg
  for cg in "${cgroups[@]}"; do mkdir -p "$cg"; done
}

fence_start_manager() {
  local home=$1 runtime=$2
  mkdir -p "$runtime/systemd/user"
  printf '[Unit]\nDescription=nothing: keeps the default user units from starting\n' \
    >"$runtime/systemd/user/greenlight-e2e.target"
  (
    for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    exec env -i HOME="$home" XDG_RUNTIME_DIR="$runtime" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      /lib/systemd/systemd --user --unit=greenlight-e2e.target --log-target=null
  ) &
  manager=$!
}

fence_leave() {
  set +e
  if [ -n "$manager" ]; then
    [ $# -gt 0 ] && timeout 20 systemctl --user stop "$@" >/dev/null 2>&1
    kill -TERM "$manager" 2>/dev/null
    timeout 10 tail --pid="$manager" -f /dev/null
  fi
  local cg procs
  for cg in "${cgroups[@]}"; do
    [ -d "$cg" ] || continue
    if [ -f "$cg/cgroup.kill" ]; then echo 1 >"$cg/cgroup.kill"; fi
    for procs in $(find "$cg" -name cgroup.procs); do
      xargs -r kill -KILL <"$procs" 2>/dev/null
    done
    for _ in $(seq 50); do
      find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
      [ -d "$cg" ] || break
      sleep 0.1
    done
  done
  umount /dev/console 2>/dev/null
  umount -l /run/systemd 2>/dev/null
  return 0
}
