#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for tests and for trying the sbatch templates without a cluster.
#
#   scripts/slurm_local_cluster.sh start DIR   # munged + slurmctld + slurmd, all state, logs and sockets in DIR
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch / srun / squeue / scontrol talk to it
#   scripts/slurm_local_cluster.sh status DIR
#   scripts/slurm_local_cluster.sh stop DIR    # stops the three daemons it started (by their pid files)
#
# Needs the Debian/Ubuntu packages `slurm-wlm` and `munge` (apt-get install -y slurm-wlm munge) and root
# (slurmd runs jobs as their submitting user). Ports: SLURM_LOCAL_PORT (slurmctld) and SLURM_LOCAL_PORT+1
# (slurmd), default 16817. No cgroups needed: processes are tracked through /proc.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf

pid_of() { [[ -s $dir/$1.pid ]] && cat "$dir/$1.pid"; }
alive() { local pid; pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null; }

start() {
    for tool in munged mungekey slurmctld slurmd scontrol; do
        command -v "$tool" >/dev/null || { echo "error: $tool not found: apt-get install -y slurm-wlm munge" >&2; exit 3; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "error: the local cluster runs its daemons as root" >&2; exit 3; }
    mkdir -p "$dir"/{state,spool,munge}
    chmod 700 "$dir" "$dir/munge"
    local host port cpus mem
    host=$(hostname -s)
    port=${SLURM_LOCAL_PORT:-16817}
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS (set for test workers)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

    [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"

    cat > "$conf" <<EOF
ClusterName=deitlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# seconds between SIGTERM and SIGKILL when a job is cancelled or requeued
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    slurmctld -i
    slurmd
    for _ in $(seq 60); do
        if scontrol show node "$host" 2>/dev/null | grep -qE "State=(IDLE|MIXED|ALLOCATED)"; then
            echo "local Slurm up: export SLURM_CONF=$conf"
            return 0
        fi
        sleep 1
    done
    echo "error: the local Slurm node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    stop
    exit 1
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        if alive "$name"; then
            pid=$(pid_of "$name")
            kill "$pid"
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$dir/$name.pid"
    done
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; fi
    done
    alive slurmctld && sinfo
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
