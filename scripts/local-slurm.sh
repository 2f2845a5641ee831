#!/usr/bin/env bash
# One-node SLURM cluster on localhost (Debian slurm-wlm + munge), recipe: docs/local-slurm.md.
# Usage: scripts/local-slurm.sh start|stop|status|env
# Partitions: main (default) and cpt, both on this node.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)

die() { echo "local-slurm: $*" >&2; exit 1; }

install_pkgs() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then return 0; fi
  [[ $(id -u) -eq 0 ]] || die "SLURM not installed and not root (cannot apt-get install)"
  command -v apt-get >/dev/null || die "no apt-get (not Debian/Ubuntu)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y slurmctld slurmd slurm-client munge >/dev/null; } \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

# The cluster's slurm.conf on stdout.
conf_text() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2/1024*0.8}' /proc/meminfo)
  cat <<CONF
ClusterName=local
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
MpiDefault=none
# At the time limit slurmd sends SIGTERM, waits KillWait seconds, then SIGKILL.
KillWait=30
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=main Nodes=${host} Default=YES MaxTime=INFINITE State=UP
# A second, non-default partition on the same node: a study that sets slurm.partition: cpt must land here.
PartitionName=cpt Nodes=${host} Default=NO MaxTime=INFINITE State=UP
CONF
}

# Write slurm.conf; print "changed" when its content changed.
write_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
  local new
  new=$(conf_text)
  if [[ ! -s $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    printf '%s\n' "$new" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    echo changed
  fi
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [[ $(id -u) -eq 0 ]] || die "must be root to start daemons"
  install_pkgs
  if alive /run/slurmctld.pid && alive /run/slurmd.pid && sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    # running daemons pick up a changed slurm.conf (e.g. a partition added) without a restart
    if [[ -n $(write_conf) ]]; then scontrol reconfigure && echo "local-slurm: reconfigured"; fi
    echo "local-slurm: already running"; return 0
  fi
  write_conf >/dev/null
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey -c -k /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /var/lib/munge /var/log/munge; chown munge:munge /var/lib/munge /var/log/munge
  alive /run/munge/munged.pid || su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge does not work"
  alive /run/slurmctld.pid || /usr/sbin/slurmctld
  alive /run/slurmd.pid || /usr/sbin/slurmd
  local i
  for i in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then echo "local-slurm: node idle"; return 0; fi
    sleep 1
  done
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  die "node did not become idle in 60 s"
}

stop() {
  local f
  for f in "${PIDS[@]}"; do
    if alive "$f"; then kill "$(cat "$f")" && echo "local-slurm: stopped $(basename "$f" .pid)"; fi
  done
}

status() {
  local f
  for f in "${PIDS[@]}"; do
    if alive "$f"; then echo "$(basename "$f" .pid): running ($(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; fi
  done
  sinfo 2>/dev/null || true
}

# Snakemake flags for this cluster: no accounting database (status from squeue), fast polling, no
# account. No partition: jobs go to the default partition `main` unless the study config (or a rule)
# names one (slurm.partition).
env_flags() {
  echo "--executor slurm --slurm-status-command squeue --slurm-init-seconds-before-status-checks 1 --seconds-between-status-checks 1 --slurm-no-account"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_flags ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
