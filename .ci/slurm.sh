#!/usr/bin/env bash
# CI helper: install the Slurm packages if needed, start the one-node test cluster
# (slurm/start.sh; base directory $LXMERT_SLURM_BASE, default /tmp/lxmert-slurm) and print its
# status. Exits non-zero, after the failing daemon's log, when the cluster does not come up.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
bash slurm/install.sh
t1=$SECONDS
bash slurm/start.sh "${LXMERT_SLURM_BASE:-}"
t2=$SECONDS
echo "slurm: install $((t1 - t0)) s, start $((t2 - t1)) s"
sinfo
sacctmgr -n show cluster format=Cluster,ControlHost,RPC
