#!/usr/bin/env bash
# A one-host Slurm cluster on loopback for the executor's tests: munge, slurmctld and slurmd
# from Debian's slurm-wlm, no systemd, no cgroups (proctrack/linuxproc, task/none), no accounting
# daemon (the executor reads job states from scontrol, which remembers finished jobs MinJobAge s).
# The daemons it starts are found again by their pid files, never by name: a system Slurm on the
# same host is left alone.
#
#   scripts/slurm-loopback.sh start   # installs the packages when missing, starts the daemons,
#                                     # prints `export SLURM_CONF=...` for the shell to eval
#   scripts/slurm-loopback.sh stop
#
# The node declares 16 CPUs whatever the host has, so that several one-CPU jobs run at once.
set -euo pipefail

dir="${DISTILLERY_SLURM_DIR:-/tmp/distillery-slurm}"
conf="$dir/slurm.conf"

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
}

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  local user
  user="$(id -un)"
  cat >"$conf" <<EOF
ClusterName=distillery-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# The node declares more CPUs than the host has: slurmd takes the configuration's word.
SlurmdParameters=config_overrides
MpiDefault=none
# Time limits are enforced within seconds, and a job killed for its limit goes within 2 s.
KillWait=2
OverTimeLimit=0
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=16 Sockets=1 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install
  write_conf
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key >/dev/null 2>&1
    if [ "$(id -u)" -eq 0 ]; then munged --force; else munged; fi
  fi
  export SLURM_CONF="$conf"
  running slurmctld || slurmctld -f "$conf" -i
  # -N: the node is "localhost" whatever the host is called.
  running slurmd || slurmd -f "$conf" -N localhost
  # A node drained by an earlier configuration comes back.
  timeout 10 scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    if timeout 5 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm-loopback: the node did not come up; see $dir/log" >&2
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  return 1
}

# Whether the daemon this script started (its pid file in $dir/run) is alive.
running() {
  local pid
  pid="$(cat "$dir/run/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] || return 1
  # An exited daemon whose parent has not reaped it yet is a zombie (state Z): not running.
  local state
  state="$(ps -o stat= -p "$pid" 2>/dev/null)" || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

stop() {
  local d
  for d in slurmd slurmctld; do
    running "$d" && kill "$(cat "$dir/run/$d.pid")" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    running slurmd || running slurmctld || return 0
    sleep 0.2
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
