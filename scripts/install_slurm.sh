#!/usr/bin/env bash
# The Debian/Ubuntu packages behind tests/test_slurm.py and scripts/slurm_local_cluster.sh (Slurm + munge).
# Without root (and without password-less sudo) it says so and changes nothing: the Slurm tests then skip.
set -euo pipefail
if command -v sbatch >/dev/null && command -v munged >/dev/null && command -v slurmd >/dev/null; then
    echo "slurm-wlm and munge are installed"
    exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    if ! sudo -n true 2>/dev/null; then
        echo "skipping slurm-wlm/munge (needs root): the Slurm tests will skip" >&2
        exit 0
    fi
    sudo="sudo -n"
fi
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "installed slurm-wlm and munge"
