#!/usr/bin/env bash
# Stop the test cluster started by slurm/start.sh: slurmd, slurmctld, slurmdbd, MariaDB, munged,
# each by its pid file under BASE_DIR (SIGTERM, wait, SIGKILL after 30 s).
#
#   bash slurm/stop.sh [BASE_DIR]
#
# State, logs and the accounting database stay in BASE_DIR, so start.sh resumes where it stopped;
# remove BASE_DIR after stopping for a clean slate. Jobs still running keep their processes
# (slurmstepd) and are picked up again by the next start, as on any Slurm node.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh" "${1:-}"
[[ $EUID -eq 0 ]] || { echo "slurm/stop.sh: must run as root" >&2; exit 1; }

status=0
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  stop_daemon "${DAEMONS[i]}" || status=1
done
print_status
exit "$status"
