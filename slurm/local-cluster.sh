#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, to try sbatch scripts before a SuperPOD sees them.
#
#   slurm/local-cluster.sh up       install slurm-wlm + munge if missing (apt-get, needs root),
#                                   write the config, start munged, slurmctld and slurmd
#   slurm/local-cluster.sh up --nodes 2
#                                   the same with two nodes, n1 and n2: each slurmd runs in its own
#                                   network namespace (address 10.77.0.<i+1> on a bridge, its own
#                                   hostname and /etc/hosts), so a job's steps on n1 and n2 meet
#                                   over the network as on a real cluster; the filesystem is shared
#                                   (as Lustre would be). Needs ip(8) and unshare(1).
#   slurm/local-cluster.sh status   daemons, node state and queue; exit 0 when the cluster is up
#   slurm/local-cluster.sh down     stop the daemons this helper started (packages stay installed)
#
# The node is this host (or each of n1..nN: all its CPUs each) with no GPUs, so jobs must ask for no GPUs:
#   sbatch --nodes=1 --gres=none --cpus-per-task=$(nproc) slurm/pretrain.sh experiment=toy
#
# Runs as root: the daemons need it, and SlurmUser=root keeps the config to one file. Everything the
# daemons write lives under $LOCAL_SLURM_DIR; /etc/slurm/slurm.conf is written only when absent or
# when this helper wrote it before (it carries a marker line), so a real cluster's config is safe.
set -euo pipefail

STATE_DIR="${LOCAL_SLURM_DIR:-/var/tmp/vlm-train-local-slurm}"
NODES=1                 # `up --nodes N`; recorded in $STATE_DIR/nodes for `down` and `status`
BRIDGE=vlmslurm0        # multi-node mode: the hosts' "switch", 10.77.0.1 on this machine
SUBNET=10.77.0
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

node_names() { if (( NODES > 1 )); then seq -f 'n%g' 1 "$NODES"; else echo "$HOST"; fi; }

# One node line per node: this host, or n<i> at 10.77.0.<i+1> in its network namespace.
node_lines() {
  local i
  if (( NODES == 1 )); then
    echo "NodeName=$HOST CPUs=$(cpu_count) RealMemory=$(real_memory_mb) State=UNKNOWN"
    echo "PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
    return
  fi
  for i in $(seq "$NODES"); do
    echo "NodeName=n$i NodeAddr=$SUBNET.$((i + 1)) NodeHostname=n$i CPUs=$(cpu_count) RealMemory=$(real_memory_mb) State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
}

write_config() {
  if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this helper; refusing to overwrite a real cluster's config"
  fi
  mkdir -p /etc/slurm "$STATE_DIR"/{state,spool,log,run}
  local controller="$HOST"
  (( NODES == 1 )) || controller="$HOST($SUBNET.1)"  # the nodes reach the controller over the bridge
  cat >"$CONF" <<CONFEOF
$MARKER
# A one-node cluster for trying job scripts; see slurm/local-cluster.sh.
ClusterName=local
SlurmctldHost=$controller
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
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
$(node_lines)
CONFEOF
}

# Multi-node mode: a bridge on this machine and, per node, a network namespace with one end of a
# veth pair, its address, and /etc/netns/<ns>/hosts (ip-netns(8) binds it over /etc/hosts there).
netns_of() { echo "vlm-slurm-$1"; }

hosts_file() {
  local i
  echo "127.0.0.1 localhost"
  echo "$SUBNET.1 $HOST"
  for i in $(seq "$NODES"); do echo "$SUBNET.$((i + 1)) n$i"; done
}

network_up() {
  local tool
  for tool in ip nsenter unshare; do
    command -v "$tool" >/dev/null || die "--nodes needs ip(8), nsenter(1) and unshare(1) (iproute2, util-linux): $tool is missing"
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge && ip addr add "$SUBNET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up
  } || die "cannot create the bridge $BRIDGE (network namespaces need root and a kernel that allows them)"
  local i ns
  for i in $(seq "$NODES"); do
    ns="$(netns_of "n$i")"
    mkdir -p "/etc/netns/$ns"
    hosts_file >"/etc/netns/$ns/hosts"
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip link add "vlm-h$i" type veth peer name "vlm-c$i"
    ip link set "vlm-c$i" netns "$ns"
    ip link set "vlm-h$i" master "$BRIDGE"
    ip link set "vlm-h$i" up
    ip netns exec "$ns" ip addr add "$SUBNET.$((i + 1))/24" dev "vlm-c$i"
    ip netns exec "$ns" ip link set "vlm-c$i" up
    ip netns exec "$ns" ip link set lo up
  done
}

network_down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '/^vlm-slurm-/ { print $1 }'); do
    ip netns del "$ns"
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

start_slurmd() {
  local node="$1"
  pid_alive "$STATE_DIR/run/slurmd-$node.pid" && return 0
  mkdir -p "$STATE_DIR/spool/$node"
  if (( NODES == 1 )); then
    slurmd -N "$node"
  else
    # Its own network, hostname (UTS namespace) and /etc/hosts (a private mount namespace): what
    # runs there sees node n<i>. Not `ip netns exec`, which remounts /sys and hides the cgroup
    # filesystem slurmd probes.
    local ns
    ns="$(netns_of "$node")"
    nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
      "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $node && exec slurmd -N $node"
  fi
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_node_idle() {
  local node="$1" state=""
  for _ in $(seq 60); do
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
    # A trailing flag (idle*: not responding, idle~: powered off, ...) means not usable yet.
    case "$state" in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $node is '${state:-unknown}' after 30 s; see $STATE_DIR/log/slurmctld.log and slurmd-$node.log"
}

up() {
  mkdir -p "$STATE_DIR"
  install_packages
  need_root "starting the Slurm daemons"
  write_config
  start_munge
  local before
  before="$(cat "$STATE_DIR/nodes" 2>/dev/null || echo "$NODES")"
  if [[ "$before" != "$NODES" ]]; then
    pid_alive "$STATE_DIR/run/slurmctld.pid" && die "the cluster is up with $before node(s): run '$0 down' first"
    rm -rf "$STATE_DIR/state" && mkdir -p "$STATE_DIR/state"  # the old nodes' and jobs' saved state
  fi
  (( NODES == 1 )) || network_up
  echo "$NODES" >"$STATE_DIR/nodes"
  pid_alive "$STATE_DIR/run/slurmctld.pid" || slurmctld
  local node
  for node in $(node_names); do start_slurmd "$node"; done
  for node in $(node_names); do wait_node_idle "$node"; done
  say "up: node(s) $(node_names | paste -sd, -) ($(cpu_count) CPUs each, no GPUs), partition 'local'; state in $STATE_DIR"
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
  local file
  for file in "$STATE_DIR"/run/slurmd*.pid; do
    [[ -e "$file" ]] && stop_pidfile "$file" "$(basename "$file" .pid)"
  done
  stop_pidfile "$STATE_DIR/run/slurmctld.pid" slurmctld
  network_down
  if [[ -f "$STATE_DIR/started-munged" ]]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$STATE_DIR/started-munged"
  fi
}

status() {
  local ok=0
  NODES="$(cat "$STATE_DIR/nodes" 2>/dev/null || echo 1)"
  local daemons=(slurmctld) node
  for node in $(node_names); do daemons+=("slurmd-$node"); done
  for daemon in "${daemons[@]}"; do
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
  up)
    if [[ "${2:-}" == --nodes ]]; then
      [[ "${3:-}" =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a number of nodes (1-99), got '${3:-}'"
      NODES="$3"
    elif [[ -n "${2:-}" ]]; then
      die "unknown option '$2' (usage: $0 up [--nodes N])"
    fi
    up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
