#!/usr/bin/env bash
# One-node SLURM cluster on localhost (Debian slurm-wlm + munge), recipe: docs/local-slurm.md.
# Usage: [LOCAL_SLURM_NODES=2] scripts/local-slurm.sh start|stop|status|env
# Partitions: main (default) and cpt, both on every node.
# LOCAL_SLURM_NODES=N (N > 1): N node names on this one host (<host>n1..n<N>, NodeAddr 127.0.0.1, one
# slurmd each, started with `slurmd -N`, each with nproc/N cores), so multi-node jobs (srun across nodes,
# torchrun rendezvous between them) can run here. Starting with another node count restarts the daemons.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODES=${LOCAL_SLURM_NODES:-1}
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "local-slurm: LOCAL_SLURM_NODES must be a positive integer" >&2; exit 2; }

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
  local nodes_line node_names
  if (( NODES == 1 )); then
    nodes_line="NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    node_names=${host}
  else
    local i per_cpus=$(( cpus / NODES > 0 ? cpus / NODES : 1 )) per_mem=$(( mem / NODES ))
    nodes_line=""
    for i in $(seq "$NODES"); do
      nodes_line+="NodeName=${host}n${i} NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=${per_cpus} RealMemory=${per_mem} State=UNKNOWN"$'\n'
    done
    nodes_line=${nodes_line%$'\n'}
    node_names="${host}n[1-${NODES}]"
  fi
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
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
MpiDefault=none
# At the time limit slurmd sends SIGTERM, waits KillWait seconds, then SIGKILL.
KillWait=30
${nodes_line}
PartitionName=main Nodes=${node_names} Default=YES MaxTime=INFINITE State=UP
# A second, non-default partition on the same nodes: a study that sets slurm.partition: cpt must land here.
PartitionName=cpt Nodes=${node_names} Default=NO MaxTime=INFINITE State=UP
CONF
}

# Node names of the configuration written for NODES.
node_names() {
  local host i
  host=$(hostname -s)
  if (( NODES == 1 )); then echo "$host"; else for i in $(seq "$NODES"); do echo "${host}n${i}"; done; fi
}

# Node names of the running configuration (from slurm.conf's NodeName lines).
conf_nodes() { sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF" 2>/dev/null; }

slurmd_pid() { echo "/run/slurmd-$1.pid"; }

# Write slurm.conf; print "changed" when its content changed.
write_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm /run/munge
  local n
  for n in $(node_names); do mkdir -p "/var/spool/slurmd-$n"; done
  local new
  new=$(conf_text)
  if [[ ! -s $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    printf '%s\n' "$new" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    echo changed
  fi
}

# A pid file's daemon is alive only while that pid still runs the daemon the file is named after
# (slurmd-<node>.pid: slurmd, slurmctld.pid, munged.pid): on a machine that kept /run across a crash or
# a killed session the file can hold a pid another process has since been given (once the test runner
# itself, which stop_slurm then killed).
alive() {
  [[ -s $1 ]] || return 1
  local pid want
  pid=$(cat "$1")
  want=$(basename "$1" .pid)
  want=${want%%-*}
  kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$want" ]]
}

all_slurmd_alive() {
  local n
  for n in $(conf_nodes); do alive "$(slurmd_pid "$n")" || return 1; done
}

stop_slurm() {
  local n
  for n in $(conf_nodes); do
    if alive "$(slurmd_pid "$n")"; then kill "$(cat "$(slurmd_pid "$n")")" && echo "local-slurm: stopped slurmd $n"; fi
  done
  if alive /run/slurmctld.pid; then kill "$(cat /run/slurmctld.pid)" && echo "local-slurm: stopped slurmctld"; fi
  local i
  for i in $(seq 30); do
    if ! alive /run/slurmctld.pid && ! pgrep -x slurmd >/dev/null; then break; fi
    sleep 0.5
  done
}

start() {
  [[ $(id -u) -eq 0 ]] || die "must be root to start daemons"
  install_pkgs
  local clear=""
  if alive /run/slurmctld.pid && all_slurmd_alive && sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    if [[ "$(conf_nodes | tr '\n' ' ')" == "$(node_names | tr '\n' ' ')" ]]; then
      # running daemons pick up a changed slurm.conf (e.g. a partition added) without a restart
      if [[ -n $(write_conf) ]]; then scontrol reconfigure && echo "local-slurm: reconfigured"; fi
      echo "local-slurm: already running"; return 0
    fi
    echo "local-slurm: restarting with $NODES node(s)"
    stop_slurm
    clear="-c"  # other node names: start slurmctld without the old nodes' saved state
  elif [[ -s $CONF && "$(conf_nodes | tr '\n' ' ')" != "$(node_names | tr '\n' ' ')" ]]; then
    stop_slurm
    clear="-c"
  fi
  write_conf >/dev/null
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey -c -k /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /var/lib/munge /var/log/munge; chown munge:munge /var/lib/munge /var/log/munge
  alive /run/munge/munged.pid || su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge does not work"
  alive /run/slurmctld.pid || /usr/sbin/slurmctld $clear
  local n
  for n in $(node_names); do
    alive "$(slurmd_pid "$n")" || /usr/sbin/slurmd -N "$n"  # -N: the pid file's %n is the node name
  done
  local i
  for i in $(seq 60); do
    if [[ $(sinfo -h -N -p main -o %t 2>/dev/null | grep -c idle) -ge $NODES ]]; then
      echo "local-slurm: $NODES node(s) idle"; return 0
    fi
    sleep 1
  done
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2 || true
  die "nodes did not become idle in 60 s"
}

stop() {
  stop_slurm
  if alive /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)" && echo "local-slurm: stopped munged"; fi
}

status() {
  local n
  for n in $(conf_nodes); do
    if alive "$(slurmd_pid "$n")"; then echo "slurmd $n: running ($(cat "$(slurmd_pid "$n")"))"; else echo "slurmd $n: stopped"; fi
  done
  local f
  for f in /run/slurmctld.pid /run/munge/munged.pid; do
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
