#!/usr/bin/env bash
# Start or stop a SLURM cluster on this machine (tests, and trying the sbatch scripts).
#   launch/slurm_local.sh start STATE_DIR [NODES]  # prints SLURM_CONF=STATE_DIR/slurm.conf
#   launch/slurm_local.sh stop STATE_DIR
# Installs Debian's slurm-wlm and munge with apt-get when missing (needs root), starts munged
# (unless one runs), then slurmctld and slurmd with a slurm.conf written to STATE_DIR. Clients
# export the printed SLURM_CONF. Ports: SLURMCTLD_PORT (default 6817), SLURMD_PORT (6818).
# The node is at 127.0.0.2. NODES (default 1) > 1 simulates that many nodes: one slurmd each
# (`slurmd -N nI`), named n1, n2, ... on addresses 127.0.0.2, 127.0.0.3, ... and ports
# SLURMD_PORT, SLURMD_PORT+1, ... (never 127.0.0.1: Ray 2.60 replaces a node address of 127.0.0.1 by the host's outward one,
# `ray._raylet.is_localhost`, so a Ray head started there by slurm/ray.sbatch would leave lo).
# `stop` ends only the daemons this script started (pid files in STATE_DIR).
set -euo pipefail
action=${1:?usage: slurm_local.sh start|stop STATE_DIR}
state=$(mkdir -p "${2:?usage: slurm_local.sh start|stop STATE_DIR}" && cd "$2" && pwd)
conf=$state/slurm.conf

stop_pidfile() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

if [[ $action == stop ]]; then
  for file in "$state"/slurmd*.pid; do stop_pidfile "$file"; done
  stop_pidfile "$state/slurmctld.pid"
  stop_pidfile "$state/munged.pid"
  exit 0
fi
[[ $action == start ]] || { echo "usage: slurm_local.sh start|stop STATE_DIR [NODES]" >&2; exit 2; }
nodes=${3:-1}
[[ $nodes =~ ^[1-9][0-9]?$ ]] || { echo "NODES must be a number from 1 to 99, got '$nodes'" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  [[ $(id -u) -eq 0 ]] || { echo "slurm-wlm and munge are missing; installing them needs root" >&2; exit 1; }
  command -v apt-get >/dev/null || { echo "slurm-wlm and munge are missing and there is no apt-get" >&2; exit 1; }
  echo "[slurm] apt-get install slurm-wlm munge" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
    >"$state/apt.log" 2>&1 || { tail -5 "$state/apt.log" >&2; exit 1; }
fi
[[ $(id -u) -eq 0 ]] || { echo "slurmd must run as root (this script starts a root-run cluster)" >&2; exit 1; }

# munge: one key and one daemon per machine; reuse a running one.
if ! munge -n </dev/null >/dev/null 2>&1; then
  [[ -f /etc/munge/munge.key ]] || { mkdir -p /etc/munge && dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  # The pid file goes where the munge user may write; STATE_DIR may be private to root.
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid >"$state/munged.log" 2>&1 || {
    echo "could not start munged: $(tail -1 "$state/munged.log")" >&2; exit 1; }
  for _ in $(seq 20); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.25; done
  cp /run/munge/munged.pid "$state/munged.pid"
fi

node=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
slurmd_port=${SLURMD_PORT:-6818}
mkdir -p "$state/ctld" "$state/spool"
if (( nodes == 1 )); then
  names=$node suffix=""
  node_lines="NodeName=$node NodeAddr=127.0.0.2 CPUs=$cpus State=UNKNOWN"
else
  # Each slurmd is told its node name (-N); %n keeps their spool, pid and log files apart.
  names=$(seq -s, -f "n%g" 1 "$nodes") suffix="-%n" node_lines=""
  for i in $(seq 1 "$nodes"); do
    node_lines+="NodeName=n$i NodeHostname=$node NodeAddr=127.0.0.$(( i + 1 ))"
    node_lines+=" Port=$(( slurmd_port + i - 1 )) CPUs=$cpus State=UNKNOWN"$'\n'
    mkdir -p "$state/spool/n$i"
  done
  node_lines=${node_lines%$'\n'}
fi
cat >"$conf" <<EOF
ClusterName=distsparse
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool${suffix:+/%n}
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd$suffix.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd$suffix.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
$node_lines
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$conf
slurmctld -f "$conf" || { tail -5 "$state/slurmctld.log" >&2; exit 1; }
if (( nodes == 1 )); then
  slurmd -f "$conf" || { tail -5 "$state/slurmd.log" >&2; exit 1; }
else
  for i in $(seq 1 "$nodes"); do
    slurmd -f "$conf" -N "n$i" || { tail -5 "$state/slurmd-n$i.log" >&2; exit 1; }
  done
fi
for _ in $(seq 60); do
  [[ $(sinfo -h -N -o %t 2>/dev/null | sort -u) == idle ]] && { echo "SLURM_CONF=$conf"; exit 0; }
  sleep 0.5
done
echo "the nodes did not become idle: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ' ')" >&2
exit 1
