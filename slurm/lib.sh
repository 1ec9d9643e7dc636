# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this file
# Shared by start.sh, stop.sh and status.sh (sourced, not run), which take
#   [--nodes 1|2] [BASE_DIR]
# Layout of the test cluster: everything it writes lives under one base directory, so wiping that
# directory resets Slurm's state and its accounting database together (job ids never clash with
# stale records).
#
# One node (default): node "localhost", Slurm's default ports, /etc/slurm/slurm.conf.
# Two nodes: a separate cluster "lxmert2n" that can run beside the one-node one (own base directory,
# ports 6827-6829, MariaDB on 127.0.0.1:3307; clients need SLURM_CONF=BASE/etc/slurm.conf). Node
# lxmert-n1 is this machine (198.18.0.1); node lxmert-n2 is a network namespace joined to it by a
# veth pair (198.18.0.2). 198.18.0.0/15 is reserved for network tests (RFC 2544): the /30 exists
# only on that link.

NODES=""
_base_arg=""
while (($#)); do
  case $1 in
    --nodes)
      (($# >= 2)) || { echo "${0##*/}: --nodes needs a value (1 or 2)" >&2; exit 2; }
      NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    "") shift ;;
    -*) echo "${0##*/}: unknown option $1 (usage: ${0##*/} [--nodes 1|2] [BASE_DIR])" >&2; exit 2 ;;
    *) _base_arg=$1; shift ;;
  esac
done
if [[ -n $NODES && ! $NODES =~ ^[12]$ ]]; then
  echo "${0##*/}: --nodes must be 1 or 2, got '$NODES'" >&2
  exit 2
fi
if [[ -z $_base_arg ]]; then
  if [[ $NODES == 2 ]]; then _base_arg=${LXMERT_SLURM_BASE_2N:-/tmp/lxmert-slurm-2n}
  else _base_arg=${LXMERT_SLURM_BASE:-/tmp/lxmert-slurm}; fi
fi
BASE_DIR="$(realpath -m "$_base_arg")"
# stop.sh / status.sh on a base directory without --nodes: the count start.sh recorded there
if [[ -z $NODES ]]; then
  NODES=$(cat "$BASE_DIR/etc/nodes" 2>/dev/null || echo 1)
  [[ $NODES =~ ^[12]$ ]] || NODES=1
fi
ETC="$BASE_DIR/etc"
RUN="$BASE_DIR/run"
LOG="$BASE_DIR/log"
MUNGE_RUN="$RUN/munge"            # owned by the munge user: munged writes its pid file here
DB_RUN="$RUN/mariadb"             # owned by mysql, for the same reason
DB_DATA="$BASE_DIR/mariadb"       # MariaDB data directory, owned by mysql
SLURM_CONF_FILE="$ETC/slurm.conf"
if [[ $NODES == 1 ]]; then
  DB_SOCKET=/run/mysqld/mysqld.sock # the client library's default: slurmdbd finds it with StorageHost=localhost
  SYSTEM_SLURM_CONF=/etc/slurm/slurm.conf  # where sbatch/sacct/squeue look when SLURM_CONF is unset
  CLUSTER_NAME=lxmert
  NODE_NAMES=(localhost)
else
  DB_SOCKET="$DB_RUN/mysqld.sock"  # slurmdbd uses TCP (DB_PORT); the socket is for our own checks
  DB_PORT=3307
  SYSTEM_SLURM_CONF=""             # /etc/slurm/slurm.conf stays the one-node cluster's
  CLUSTER_NAME=lxmert2n
  NODE_NAMES=(lxmert-n1 lxmert-n2)
  CTLD_PORT=6827 SLURMD_PORT=6828 DBD_PORT=6829
  NETNS=lxmert-n2                  # the second node's network namespace
  VETH_HOST=lxm-veth0 VETH_NS=lxm-veth1
  ADDR_N1=198.18.0.1 ADDR_N2=198.18.0.2 PREFIX_LEN=30
  HOSTS_FILE="$ETC/hosts"          # bind-mounted over /etc/hosts for the slurmds and their jobs only
  export SLURM_CONF="$SLURM_CONF_FILE"  # our own clients (sinfo, scontrol) talk to this cluster
fi

# daemon name -> pid file (the daemon's process name is the same as its key)
declare -A PID_FILE=(
  [munged]="$MUNGE_RUN/munged.pid"
  [mariadbd]="$DB_RUN/mariadbd.pid"
  [slurmdbd]="$RUN/slurmdbd.pid"
  [slurmctld]="$RUN/slurmctld.pid"
  [slurmd]="$RUN/slurmd.pid"
)
declare -A LOG_FILE=(
  [munged]="$LOG/munged.log"
  [mariadbd]="$LOG/mariadbd.log"
  [slurmdbd]="$LOG/slurmdbd.log"
  [slurmctld]="$LOG/slurmctld.log"
  [slurmd]="$LOG/slurmd.log"
)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop goes in reverse
if [[ $NODES == 2 ]]; then
  # one slurmd per node (SlurmdPidFile/SlurmdLogFile use %n); "slurmd-n2" runs in $NETNS
  PID_FILE[slurmd]="$RUN/slurmd-lxmert-n1.pid"
  LOG_FILE[slurmd]="$LOG/slurmd-lxmert-n1.log"
  PID_FILE[slurmd-n2]="$RUN/slurmd-lxmert-n2.pid"
  LOG_FILE[slurmd-n2]="$LOG/slurmd-lxmert-n2.log"
  DAEMONS+=(slurmd-n2)
fi

# PID of a daemon if it is alive, else nothing. PID 1 here does not reap orphans, so a killed
# daemon lingers as a zombie (state Z): that counts as stopped. The process name must match, so a
# recycled PID is never mistaken for (or killed as) our daemon.
daemon_pid() {
  local name=$1 file=${PID_FILE[$1]} pid comm
  [[ -r $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] || return 1
  pid_alive "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "${name%%-*}" ]] || return 1  # slurmd-n2 is a slurmd too
  echo "$pid"
}

# A daemon serves this cluster: ours by its pid file, or for munged also one another base (the
# other test cluster) started, since both clusters share /run/munge.
daemon_up() {
  daemon_pid "$1" >/dev/null && return 0
  [[ $1 == munged ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

# A process that exists and is not a zombie.
pid_alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ') || return 1
  [[ -n $state && $state != Z* ]]
}

# Wait until "$@" succeeds, at most $timeout seconds (polled every 0.2 s).
wait_for() {
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# Like wait_for, but gives up as soon as daemon $2 has died (allowing 3 s for its pid file), so a
# daemon that exits at once (bad config, port taken) fails fast with its log instead of a timeout.
wait_ready() {
  local timeout=$1 name=$2
  shift 2
  local deadline=$((SECONDS + timeout)) grace=$((SECONDS + 3))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    if ((SECONDS >= grace)) && ! daemon_pid "$name" >/dev/null; then
      echo "$name is not running (exited, or wrote no pid file ${PID_FILE[$name]})" >&2
      return 1
    fi
    sleep 0.2
  done
}

node_state() { sinfo -h -o %T 2>/dev/null | head -n1; }

# Every node of the cluster can take jobs (one line per node).
node_usable() {
  local states
  states=$(sinfo -h -N -o %T 2>/dev/null) || return 1
  [[ $(wc -l <<<"$states") -eq ${#NODE_NAMES[@]} ]] || return 1
  ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states"
}

print_status() {
  local name pid
  echo "Slurm test cluster, base directory $BASE_DIR"
  for name in "${DAEMONS[@]}"; do
    if pid=$(daemon_pid "$name"); then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    elif daemon_up "$name"; then
      printf '  %-10s running (shared; started by another base directory)\n' "$name"
    else
      printf '  %-10s stopped\n' "$name"
    fi
  done
  # the clients would wait for a timeout against a controller that is not there
  if daemon_pid slurmctld >/dev/null; then
    if [[ $NODES == 1 ]]; then
      printf '  node       %s\n' "$(node_state || true)"
    else
      sinfo -h -N -o '  node       %N %T (%c CPU, address %o)' 2>/dev/null || true
    fi
  fi
  if daemon_pid slurmdbd >/dev/null; then
    printf '  cluster    %s\n' "$(sacctmgr -n -P show cluster format=Cluster 2>/dev/null | head -n1 || true)"
  fi
}

# Stop one daemon by its pid file: SIGTERM, wait, then SIGKILL as a last resort.
stop_daemon() {
  local name=$1 pid
  pid=$(daemon_pid "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_for 30 not_running "$name"; then
    echo "$name (pid $pid) ignored SIGTERM for 30 s: sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait_for 5 not_running "$name" || { echo "$name (pid $pid) would not stop" >&2; return 1; }
  fi
  echo "stopped $name (pid $pid)"
}

not_running() { ! daemon_pid "$1" >/dev/null; }
