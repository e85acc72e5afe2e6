#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing `trainer slurm` against the real thing.
#
#   scripts/slurm/local_cluster.sh start    # install (once), configure, start; wait for the node
#   scripts/slurm/local_cluster.sh stop     # stop the daemons this script started
#   scripts/slurm/local_cluster.sh env      # print `export SLURM_CONF=...` for the client commands
#
# start installs Debian's slurm-wlm and munge with apt-get when they are missing (root only),
# writes a minimal slurm.conf into $TRAINER_SLURM_DIR (default /tmp/trainer-slurm): this host as
# the only node (CPUs = nproc), no cgroups (proctrack/linuxproc, task/none), no accounting,
# JobRequeue=1, and its own ports (16817/16818) so that it never meets a system Slurm. It leaves
# /etc/slurm alone: the client commands find the config through SLURM_CONF. Each start stops the
# daemons of an earlier start and begins with an empty job state.
#
# Exit codes: 0 ready; 77 this machine cannot run it (not root, no apt-get, a daemon does not
# come up): the last line of output then starts with `SKIPPED:` and says why; 1 other errors.
set -uo pipefail

DIR="${TRAINER_SLURM_DIR:-/tmp/trainer-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
# The node's name in Slurm; slurmd is told it (-N), so that nothing needs this host's name to
# resolve (NodeAddr is 127.0.0.1).
NODE=trainer-node

log() { echo "[local-slurm] $*" >&2; }
skip() {
    echo "SKIPPED: $*"
    exit 77
}

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops a daemon by the pid in its pid file (only the one this script started) and waits for it.
stop_pidfile() {
    local file="$1" pid
    pid_alive "$file" || return 0
    pid="$(cat "$file")"
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
}

install() {
    local missing=()
    for cmd in sbatch srun scontrol scancel sinfo slurmctld slurmd munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || skip "Slurm is not installed (${missing[*]} missing) and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed (${missing[*]} missing) and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get (once)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        apt-get update -qq >&2 || skip "apt-get update failed"
    fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 ||
        skip "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged is already serving (ours from an earlier start, or the system's)
    fi
    [[ -s /etc/munge/munge.key ]] || skip "/etc/munge/munge.key is missing (the munge package creates it)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged >&2
    else
        munged --force >&2
    fi
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    skip "munged did not start"
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node test cluster.
ClusterName=trainer-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# How long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60 s), so that a requeued job starts soon after its
# begin time.
SchedulerParameters=sched_interval=2
SwitchType=switch/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$NODE NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

stop() {
    # Jobs first (all of this test cluster's jobs are ours), so that no task outlives slurmd.
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        export SLURM_CONF="$CONF"
        if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
            scancel --user="$(id -un)" 2>/dev/null
            for _ in $(seq 60); do
                [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
}

start() {
    install
    [[ $(id -u) -eq 0 ]] || skip "starting slurmctld and slurmd needs root"
    stop
    start_munge
    rm -rf "$DIR/state" "$DIR/spool"
    write_config
    export SLURM_CONF="$CONF"
    # -i: ignore state from an earlier start (none is kept anyway).
    slurmctld -f "$CONF" -i >&2 || skip "slurmctld did not start (see $DIR/slurmctld.log)"
    slurmd -f "$CONF" -N "$NODE" >&2 || skip "slurmd did not start (see $DIR/slurmd.log)"
    local state=""
    for _ in $(seq 60); do
        state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)"
        case "$state" in
        idle) log "node $NODE is idle; export SLURM_CONF=$CONF"; return 0 ;;
        down* | drain* | *fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
        esac
        sleep 0.5
    done
    tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 2>/dev/null
    skip "the node did not become idle within 30 s (state: ${state:-unknown}; logs in $DIR)"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|env" >&2
    exit 1
    ;;
esac
