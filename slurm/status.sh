#!/usr/bin/env bash
# Print which daemons of the test cluster run, the node's state and the registered cluster.
# Exit 0 when the cluster is fully up (every daemon running, node usable), else 1.
#
#   bash slurm/status.sh [--nodes 2] [BASE_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh" "$@"

print_status
for name in "${DAEMONS[@]}"; do
  daemon_up "$name" || exit 1
done
node_usable
