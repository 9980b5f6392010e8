#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, to try sbatch scripts before a SuperPOD sees them.
#
#   slurm/local-cluster.sh up       install slurm-wlm + munge if missing (apt-get, needs root),
#                                   write the config, start munged, slurmctld and slurmd
#   slurm/local-cluster.sh status   daemons, node state and queue; exit 0 when the cluster is up
#   slurm/local-cluster.sh down     stop the daemons this helper started (packages stay installed)
#
# The node is this host with all its CPUs and no GPUs, so jobs must ask for no GPUs:
#   sbatch --nodes=1 --gres=none --cpus-per-task=$(nproc) slurm/pretrain.sh experiment=toy
#
# Runs as root: the daemons need it, and SlurmUser=root keeps the config to one file. Everything the
# daemons write lives under $LOCAL_SLURM_DIR; /etc/slurm/slurm.conf is written only when absent or
# when this helper wrote it before (it carries a marker line), so a real cluster's config is safe.
set -euo pipefail

STATE_DIR="${LOCAL_SLURM_DIR:-/var/tmp/vlm-train-local-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by vlm_train slurm/local-cluster.sh"
HOST="$(hostname -s)"
MUNGE_SOCKET=/run/munge/munge.socket.2

die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

need_root() {
  [[ "$(id -u)" -eq 0 ]] || die "$1 needs root (run with sudo), or ask your admin for a Slurm cluster"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  need_root "installing ${missing[*]}"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not here (not Debian/Ubuntu); install them with your package manager"
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # A failed install usually means stale package lists; update once and retry before giving up.
  local log="$STATE_DIR/apt.log"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1 && return 0
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$log" 2>&1; then
    die "apt-get could not install ${missing[*]} (no network to the Debian mirror?); last lines of $log: $(tail -n 3 "$log" | tr '\n' ' ')"
  fi
}

start_munge() {
  if [[ -S "$MUNGE_SOCKET" ]] && munge -n </dev/null >/dev/null 2>&1; then
    return 0  # a munged is already answering (ours or the system's)
  fi
  [[ -f /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- munged
  touch "$STATE_DIR/started-munged"  # so that `down` stops only a munged it started
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

cpu_count() {
  # Not plain `nproc`: it obeys OMP_NUM_THREADS, which test runners and ML shells often set to 1.
  env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

real_memory_mb() {
  # Slurm drains a node that has less memory than configured; leave 5% headroom.
  awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.95 }' /proc/meminfo
}

write_config() {
  if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this helper; refusing to overwrite a real cluster's config"
  fi
  mkdir -p /etc/slurm "$STATE_DIR"/{state,spool,log,run}
  cat >"$CONF" <<CONFEOF
$MARKER
# A one-node cluster for trying job scripts; see slurm/local-cluster.sh.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# No cgroups in containers and sandboxes: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Short KillWait: a requeued or cancelled job's steps get SIGTERM, then SIGKILL this much later.
KillWait=10
NodeName=$HOST CPUs=$(cpu_count) RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_node_idle() {
  local state=""
  for _ in $(seq 60); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
    # A trailing flag (idle*: not responding, idle~: powered off, ...) means not usable yet.
    case "$state" in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $HOST is '${state:-unknown}' after 30 s; see $STATE_DIR/log/slurmctld.log and slurmd.log"
}

up() {
  mkdir -p "$STATE_DIR"
  install_packages
  need_root "starting the Slurm daemons"
  write_config
  start_munge
  pid_alive "$STATE_DIR/run/slurmctld.pid" || slurmctld
  pid_alive "$STATE_DIR/run/slurmd.pid" || slurmd
  wait_node_idle
  say "up: node $HOST ($(cpu_count) CPUs, no GPUs), partition 'local'; state in $STATE_DIR"
}

stop_pidfile() {
  local file="$1" name="$2" pid
  pid_alive "$file" || return 0
  pid="$(cat "$file")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { say "stopped $name"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  say "killed $name (did not stop within 10 s)"
}

down() {
  stop_pidfile "$STATE_DIR/run/slurmd.pid" slurmd
  stop_pidfile "$STATE_DIR/run/slurmctld.pid" slurmctld
  if [[ -f "$STATE_DIR/started-munged" ]]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$STATE_DIR/started-munged"
  fi
}

status() {
  local ok=0
  for daemon in slurmctld slurmd; do
    if pid_alive "$STATE_DIR/run/$daemon.pid"; then
      say "$daemon running (pid $(cat "$STATE_DIR/run/$daemon.pid"))"
    else
      say "$daemon not running"; ok=1
    fi
  done
  if [[ $ok -eq 0 ]]; then
    sinfo
    squeue
  fi
  return $ok
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
