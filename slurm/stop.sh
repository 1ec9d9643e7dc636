#!/usr/bin/env bash
# Stop the test cluster started by slurm/start.sh: slurmd, slurmctld, slurmdbd, MariaDB, munged,
# each by its pid file under BASE_DIR (SIGTERM, wait, SIGKILL after 30 s).
#
#   bash slurm/stop.sh [--nodes 2] [BASE_DIR]   (--nodes 2: the two-node cluster's default base)
#
# State, logs and the accounting database stay in BASE_DIR, so start.sh resumes where it stopped;
# remove BASE_DIR after stopping for a clean slate. Jobs still running keep their processes
# (slurmstepd) and are picked up again by the next start, as on any Slurm node.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh" "$@"
[[ $EUID -eq 0 ]] || { echo "slurm/stop.sh: must run as root" >&2; exit 1; }

status=0
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  stop_daemon "${DAEMONS[i]}" || status=1
done
# two nodes: remove the second node's network namespace (and with it the veth pair), unless job
# processes still run in it (they keep it alive anyway; the next start.sh finds it again)
if [[ $NODES == 2 ]] && ip netns list 2>/dev/null | grep -qw "$NETNS"; then
  if [[ -z $(ip netns pids "$NETNS" 2>/dev/null) ]]; then
    ip netns del "$NETNS" && echo "removed network namespace $NETNS"
  else
    echo "network namespace $NETNS kept: processes still run in it ($(ip netns pids "$NETNS" | tr '\n' ' '))"
  fi
fi
print_status
exit "$status"
