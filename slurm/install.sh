#!/usr/bin/env bash
# Install the Debian packages of the one-node test cluster; does nothing when all are installed.
# Package installs never start the services here (no systemd; "policy-rc.d denied execution of
# start" is expected): slurm/start.sh starts them.
#
#   bash slurm/install.sh
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  echo "Slurm packages already installed: ${PACKAGES[*]}"
  exit 0
fi
[[ $EUID -eq 0 ]] || { echo "slurm/install.sh: must run as root to install: ${missing[*]}" >&2; exit 1; }
echo "installing: ${missing[*]}"
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
