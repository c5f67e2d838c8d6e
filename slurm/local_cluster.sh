#!/usr/bin/env bash
# A one-machine SLURM cluster (munge, slurmctld and two slurmd on localhost), to try danube's SLURM
# path on a laptop and to test it in CI, multi-node jobs included.
#
#   bash slurm/local_cluster.sh up       # install Debian's packages if missing, write the config, start
#   bash slurm/local_cluster.sh status   # sinfo
#   bash slurm/local_cluster.sh down     # stop the daemons (the state directory is kept)
#   eval "$(bash slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch/srun/scontrol in this shell
#
# Needs root (the daemons run as root here; installing needs apt). Idempotent: `up` on a running
# cluster checks it and returns. Two nodes, this machine's name (`hostname -s`) and the same with
# `-node2`, are each this machine as `slurmd -C` sees it (its CPUs are counted twice: jobs here are
# tests), one slurmd each on its own port, in one partition `debug`. The first node's name
# resolves, as a job's rank 0 (the rendezvous, the first node of the allocation) needs. The state
# lives in $DANUBE_SLURM_DIR (default /tmp/danube-slurm).
set -euo pipefail

DIR=${DANUBE_SLURM_DIR:-/tmp/danube-slurm}
CONF=$DIR/slurm.conf
# The nodes' names. Not "localhost": SLURM takes it for this machine's name, and a second node
# beside it is refused as a duplicate host.
FIRST=$(hostname -s 2>/dev/null || true)
SECOND=$FIRST-node2

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
    mkdir -p "$DIR/state" "$DIR/spool-$FIRST" "$DIR/spool-$SECOND" "$DIR/log"
    local node
    node=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
    cat >"$CONF.tmp" <<EOF
# Written by danube's slurm/local_cluster.sh: two nodes, both this machine.
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
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$FIRST NodeAddr=127.0.0.1 Port=6818 $node State=UNKNOWN
NodeName=$SECOND NodeAddr=127.0.0.1 Port=6819 $node State=UNKNOWN
PartitionName=debug Nodes=$FIRST,$SECOND Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
        if [ "$(SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" = 2 ]; then
            return
        fi
        sleep 0.5
    done
    say "the nodes did not come up; see $DIR/log/slurmctld.log and $DIR/log/slurmd-*.log"
    SLURM_CONF=$CONF sinfo >&2 || true
    exit 1
}

up() {
    need_root
    if [ -z "$FIRST" ] || [ "$FIRST" = localhost ] || ! getent hosts "$FIRST" >/dev/null; then
        say "this machine's name '$FIRST' does not resolve (or is localhost); give it a line in /etc/hosts"
        exit 1
    fi
    install
    start_munge
    if running "$DIR/slurmctld.pid" && running "$DIR/slurmd-$FIRST.pid" && running "$DIR/slurmd-$SECOND.pid"; then
        wait_idle
        say "already up ($CONF)"
        return
    fi
    down_daemons  # a half-running cluster (or one of an older config) starts again whole
    write_config
    SLURM_CONF=$CONF slurmctld -f "$CONF"
    for node in "$FIRST" "$SECOND"; do
        SLURM_CONF=$CONF slurmd -f "$CONF" -N "$node"
    done
    wait_idle
    SLURM_CONF=$CONF scontrol update nodename="$FIRST,$SECOND" state=resume >/dev/null 2>&1 || true
    say "up: $(SLURM_CONF=$CONF sinfo -h -o '%P %D nodes %t, %c CPUs each') ($CONF)"
}

down_daemons() {
    local pid
    for pid in "$DIR"/slurmd*.pid "$DIR/slurmctld.pid"; do
        if running "$pid"; then
            kill "$(cat "$pid")"
            for _ in $(seq 1 50); do running "$pid" || break; sleep 0.1; done
        fi
    done
}

down() {
    down_daemons
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
