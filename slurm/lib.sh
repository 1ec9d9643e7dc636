# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this file
# Shared by start.sh, stop.sh and status.sh (sourced, not run).
# Layout of the test cluster: everything it writes lives under one base directory, so wiping that
# directory resets Slurm's state and its accounting database together (job ids never clash with
# stale records).

BASE_DIR="$(realpath -m "${1:-${LXMERT_SLURM_BASE:-/tmp/lxmert-slurm}}")"
ETC="$BASE_DIR/etc"
RUN="$BASE_DIR/run"
LOG="$BASE_DIR/log"
MUNGE_RUN="$RUN/munge"            # owned by the munge user: munged writes its pid file here
DB_RUN="$RUN/mariadb"             # owned by mysql, for the same reason
DB_DATA="$BASE_DIR/mariadb"       # MariaDB data directory, owned by mysql
DB_SOCKET=/run/mysqld/mysqld.sock # the client library's default: slurmdbd finds it with StorageHost=localhost
SLURM_CONF_FILE="$ETC/slurm.conf"
SYSTEM_SLURM_CONF=/etc/slurm/slurm.conf  # where sbatch/sacct/squeue look when SLURM_CONF is unset
CLUSTER_NAME=lxmert

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
  [[ $comm == "$name" ]] || return 1
  echo "$pid"
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

node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

print_status() {
  local name pid
  echo "Slurm test cluster, base directory $BASE_DIR"
  for name in "${DAEMONS[@]}"; do
    if pid=$(daemon_pid "$name"); then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-10s stopped\n' "$name"
    fi
  done
  # the clients would wait for a timeout against a controller that is not there
  if daemon_pid slurmctld >/dev/null; then
    printf '  node       %s\n' "$(node_state || true)"
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
