#!/usr/bin/env bash
# A one-machine SLURM cluster (munge + slurmctld + slurmd on localhost), to try danube's SLURM
# path on a laptop and to test it in CI.
#
#   bash slurm/local_cluster.sh up       # install Debian's packages if missing, write the config, start
#   bash slurm/local_cluster.sh status   # sinfo
#   bash slurm/local_cluster.sh down     # stop the daemons (the state directory is kept)
#   eval "$(bash slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch/srun/scontrol in this shell
#
# Needs root (the daemons run as root here; installing needs apt). Idempotent: `up` on a running
# cluster checks it and returns. The node is this machine as `slurmd -C` sees it, in one
# partition `debug`; the state lives in $DANUBE_SLURM_DIR (default /tmp/danube-slurm).
set -euo pipefail

DIR=${DANUBE_SLURM_DIR:-/tmp/danube-slurm}
CONF=$DIR/slurm.conf

say() { echo "local_cluster: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "needs root (the daemons run as root here): run it with sudo"
        exit 3
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if ! command -v apt-get >/dev/null; then
        say "slurmctld, slurmd or munged missing and no apt-get to install them (Debian/Ubuntu: slurm-wlm munge)"
        exit 3
    fi
    say "installing Debian's slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local node
    node=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]*/NodeName=localhost/')
    cat >"$CONF.tmp" <<EOF
# Written by danube's slurm/local_cluster.sh: one node, this machine.
ClusterName=danube
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=0
KillWait=10
InactiveLimit=0
MinJobAge=300
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
}

wait_idle() {
    for _ in $(seq 1 60); do
        if SLURM_CONF=$CONF sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return
        fi
        sleep 0.5
    done
    say "the node did not come up; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
    SLURM_CONF=$CONF sinfo >&2 || true
    exit 1
}

up() {
    need_root
    install
    start_munge
    if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
        wait_idle
        say "already up ($CONF)"
        return
    fi
    write_config
    running "$DIR/slurmctld.pid" || SLURM_CONF=$CONF slurmctld -f "$CONF"
    running "$DIR/slurmd.pid" || SLURM_CONF=$CONF slurmd -f "$CONF" -N localhost
    wait_idle
    SLURM_CONF=$CONF scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    say "up: $(SLURM_CONF=$CONF sinfo -h -o '%P %D %t %c CPUs') ($CONF)"
}

down() {
    for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        if running "$pid"; then
            kill "$(cat "$pid")"
        fi
    done
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
