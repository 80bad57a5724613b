#!/usr/bin/env bash
# A real SLURM cluster on this machine, for trying `athanor submit` and for the tests:
# Debian's slurm-wlm + munge, one controller and N virtual compute nodes (n1..nN) that all run
# on localhost, as root, without systemd.
#
#   launch/slurm/local-cluster.sh start    # installs the packages if missing, then starts
#   launch/slurm/local-cluster.sh status   # sinfo + squeue
#   launch/slurm/local-cluster.sh stop     # stops only the daemons this script started
#
# Env: ATHANOR_SLURM_DIR   state, logs, config, munge key (default /run/athanor-slurm)
#      ATHANOR_SLURM_NODES number of virtual nodes (default 2)
#      ATHANOR_SLURM_PORT  controller port (default 16817); the nodes listen from PORT+184 up
# Clients find the cluster through /etc/slurm/slurm.conf (a link this script adds only when no
# slurm.conf is there, and removes on stop) or `export SLURM_CONF=$ATHANOR_SLURM_DIR/etc/slurm.conf`.
#
# The daemons run as root and write into the state folder, so nobody else may be able to plant a
# link there or swap the folder: it is created by this script (mkdir, no -p, mode 755) or must
# already be a real folder owned by us and writable by no one else, holding no symbolic links,
# inside parents that no one else can rename it out of. The default sits in /run, which only
# root can write (the old default, a fixed name in the world-writable /tmp, could be planted).
set -euo pipefail
DIR=${ATHANOR_SLURM_DIR:-/run/athanor-slurm}
NODES=${ATHANOR_SLURM_NODES:-2}
# Ports away from SLURM's defaults (6817/6818) so a system SLURM on the same host is untouched.
CTLD_PORT=${ATHANOR_SLURM_PORT:-16817}
FIRST_NODE_PORT=$((CTLD_PORT + 184))

log() { echo "local-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# A folder nobody but root and us can change: owned by one of us, and writable by others only
# with the sticky bit (like /tmp: then others cannot rename or delete what is ours in it).
trusted_folder() {  # path
  local owner mode
  owner=$(stat -c %u "$1") mode=$(stat -c %a "$1")
  [ "$owner" = 0 ] || [ "$owner" = "$(id -u)" ] || return 1
  (( (8#$mode & 8#022) == 0 || (8#$mode & 8#1000) != 0 ))
}

# Checks the state folder (creating it when `create` is given) and sets DIR to its real path.
state_dir() {  # [create]
  case "$DIR" in /*) ;; *) die "ATHANOR_SLURM_DIR=$DIR: use an absolute path" ;; esac
  local parent name folder
  parent=$(dirname "$DIR") name=$(basename "$DIR")
  [ -d "$parent" ] || die "$parent does not exist (ATHANOR_SLURM_DIR=$DIR)"
  parent=$(readlink -f "$parent")  # from here on the real path: a link in it cannot be re-pointed later
  folder=$parent
  while :; do
    trusted_folder "$folder" || die "refusing $parent/$name: $folder can be changed by other users"
    [ "$folder" = / ] && break
    folder=$(dirname "$folder")
  done
  DIR=$parent/$name
  [ -L "$DIR" ] && die "refusing $DIR: it is a symbolic link (a planted one would redirect root's writes)"
  if [ ! -e "$DIR" ]; then
    [ "${1:-}" = create ] || return 1
    mkdir -m 755 "$DIR" || die "cannot create $DIR"  # no -p: fails if someone made it meanwhile
  fi
  [ -d "$DIR" ] && [ ! -L "$DIR" ] || die "refusing $DIR: not a folder"
  [ "$(stat -c %u "$DIR")" = "$(id -u)" ] || die "refusing $DIR: owned by uid $(stat -c %u "$DIR"), not by us"
  (( (8#$(stat -c %a "$DIR") & 8#022) == 0 )) || die "refusing $DIR: others may write in it"
  local link
  link=$(find "$DIR" -type l -print -quit)
  [ -z "$link" ] || die "refusing $DIR: it holds a symbolic link ($link)"
  CONF=$DIR/etc/slurm.conf
  SOCKET=$DIR/run/munge.socket
  export SLURM_CONF=$CONF
  [ ${#SOCKET} -lt 100 ] || die "$SOCKET is too long for a socket path: set ATHANOR_SLURM_DIR to a shorter one"
}

# A pidfile counts only while its process still runs under the expected name: a stale pidfile
# whose number was reused by something else is never signalled.
running() {  # pidfile command-name
  [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

wait_until() {  # seconds description command...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what (logs: $DIR/log)"; return 1; fi
    sleep 0.5
  done
}

install_packages() {
  local pkgs="munge slurmctld slurmd slurm-client"
  dpkg -s $pkgs >/dev/null 2>&1 && return 0
  log "installing $pkgs"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

node_names() { seq -f "n%g" 1 "$NODES"; }

write_config() {
  local cpus mem_mb last_port
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  last_port=$((FIRST_NODE_PORT + NODES - 1))
  cat > "$CONF.tmp" <<EOF
# Written by launch/slurm/local-cluster.sh: $NODES virtual nodes on localhost.
ClusterName=athanor-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued batch job waits this long (+1 s) before it may start again; the
# default (120 s) would make every preemption test wait two minutes.
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay visible to scontrol (athanor status / --wait) for 10 minutes.
MinJobAge=600
# Look at pending jobs every 2 s (a requeued job becomes eligible without any event to wake the scheduler).
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=10
InactiveLimit=0
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$FIRST_NODE_PORT-$last_port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

all_nodes_up() {
  [ "$(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l)" -eq "$NODES" ]
}

start() {
  state_dir create
  install_packages
  mkdir -p "$DIR"/{etc,state,log,run,munge,spool}
  local node
  for node in $(node_names); do mkdir -p "$DIR/spool/$node"; done
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  running "$DIR/run/munged.pid" munged || munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  write_config
  # Plain `sbatch` (no SLURM_CONF) finds this cluster; an existing slurm.conf is left alone.
  mkdir -p /etc/slurm
  [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ] || ln -s "$CONF" /etc/slurm/slurm.conf
  # -c: a fresh controller forgets jobs from an earlier start, whose processes are gone.
  running "$DIR/run/slurmctld.pid" slurmctld || slurmctld -c -f "$CONF"
  wait_until 30 slurmctld scontrol ping
  for node in $(node_names); do
    running "$DIR/run/slurmd-$node.pid" slurmd || slurmd -f "$CONF" -N "$node"
  done
  if ! wait_until 60 "nodes to register" all_nodes_up; then
    scontrol update nodename="n[1-$NODES]" state=resume 2>/dev/null || true
    wait_until 30 "nodes to register" all_nodes_up
  fi
  log "up: $NODES nodes; clients use $CONF (linked from /etc/slurm/slurm.conf when that was free)"
  sinfo
}

stop_daemons() {  # pidfile:name ... -> TERM, up to 10 s grace, then KILL
  local entry file pids=""
  for entry in "$@"; do
    file=${entry%%:*}
    running "$file" "${entry##*:}" && pids="$pids $(cat "$file")"
    rm -f "$file"
  done
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do kill -0 $pids 2>/dev/null || return 0; sleep 0.2; done
  kill -9 $pids 2>/dev/null || true
}

stop() {
  if ! state_dir; then log "nothing to stop: $DIR does not exist"; return 0; fi
  if running "$DIR/run/slurmctld.pid" slurmctld; then
    # Jobs run as children of our slurmd's: cancel them first so no job process outlives the cluster.
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local node_pidfiles=()
  for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && node_pidfiles+=("$f:slurmd"); done
  stop_daemons "${node_pidfiles[@]}" "$DIR/run/slurmctld.pid:slurmctld"
  stop_daemons "$DIR/run/munged.pid:munged"
  [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) state_dir || die "not started: $DIR does not exist"; sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
