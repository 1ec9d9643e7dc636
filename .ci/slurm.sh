#!/usr/bin/env bash
# CI helper: install the Slurm packages if needed, start the one-node test cluster
# (slurm/start.sh; base directory $LXMERT_SLURM_BASE, default /tmp/lxmert-slurm) and, beside it,
# the two-node one for tests/test_multinode.py (slurm/start.sh --nodes 2; $LXMERT_SLURM_BASE_2N,
# default /tmp/lxmert-slurm-2n), and print their status. Exits non-zero, after the failing
# daemon's log, when a cluster does not come up.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
bash slurm/install.sh
t1=$SECONDS
bash slurm/start.sh "${LXMERT_SLURM_BASE:-}"
t2=$SECONDS
bash slurm/start.sh --nodes 2 "${LXMERT_SLURM_BASE_2N:-}"
t3=$SECONDS
echo "slurm: install $((t1 - t0)) s, start $((t2 - t1)) s, two-node cluster $((t3 - t2)) s"
sinfo
sacctmgr -n show cluster format=Cluster,ControlHost,RPC
SLURM_CONF="${LXMERT_SLURM_BASE_2N:-/tmp/lxmert-slurm-2n}/etc/slurm.conf" sinfo -N -o "%N %T %c %o"
