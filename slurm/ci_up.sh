#!/usr/bin/env bash
# Bring up a throwaway single-node SLURM 22.05 cluster (Debian 12, as root, no systemd) for the
# SLURM tests: slurmctld + slurmd + slurmdbd/MariaDB (so sacct and submitit's job states work),
# fake GPUs, fast requeue (cred_expire=10), impossible requests rejected at sbatch time.
# Measured recipe and pitfalls: docs/slurm.md ("The local test cluster"). Stop with slurm/ci_down.sh.
# Tunables (env): SLURM_CI_CPUS (default: nproc), SLURM_CI_GPUS (fake GPUs, default 2, 0 = none),
#                 SLURM_CI_MEM_MB (default 16000), SLURM_CI_ACCOUNTING (1 = slurmdbd+MariaDB [default], 0 = none)
set -euo pipefail
CPUS=${SLURM_CI_CPUS:-$(nproc)}
GPUS=${SLURM_CI_GPUS:-2}
MEM=${SLURM_CI_MEM_MB:-16000}
ACCT=${SLURM_CI_ACCOUNTING:-1}
NODE=$(hostname -s)
LOGDIR=/var/log/slurm
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)
say() { echo "[slurm-ci +$(( $(date +%s) - t0 ))s] $*"; }
wait_for() {  # wait_for <seconds> <command...>
  local lim=$1; shift; local end=$(( $(date +%s) + lim ))
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || { echo "timeout waiting for: $*" >&2; return 1; }; sleep 0.2; done
}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 1. packages (not the slurm-wlm metapackage: 43 packages)
pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
say "packages: $(slurmd -V)"

# 2. munge (the Debian postinst creates the key; systemd would create /run/munge)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
wait_for 10 sh -c 'munge -n | unmunge'
say "munged up"

# 3. fake GPUs: gres/gpu needs File= naming character devices; clones of /dev/null do
GRES_NODE=""; GRES_TYPES=""
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOGDIR"
if [ "$GPUS" -gt 0 ]; then
  install -d /var/lib/slurm/fakegpu
  for i in $(seq 0 $((GPUS - 1))); do
    [ -c /var/lib/slurm/fakegpu/nvidia$i ] || mknod -m 666 /var/lib/slurm/fakegpu/nvidia$i c 1 3
  done
  GRES_NODE="Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"
  cat > /etc/slurm/gres.conf <<GRES
AutoDetect=off
NodeName=$NODE Name=gpu File=/var/lib/slurm/fakegpu/nvidia[0-$((GPUS - 1))]
GRES
else
  rm -f /etc/slurm/gres.conf
fi

# 4. slurm.conf
if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# requeued jobs wait cred_expire seconds before restarting (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
ReturnToService=2
# let the node claim more CPUs/memory/GPUs than the VM has
SlurmdParameters=config_overrides
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$GRES_TYPES
$ACCT_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
# reject impossible requests at sbatch time instead of leaving them PENDING forever
EnforcePartLimits=ALL
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# 5. accounting: MariaDB (socket only) + slurmdbd, so that sacct (and submitit's job states) work
if [ "$ACCT" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  if ! mariadb-admin ping >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --log-error=$LOGDIR/mariadb.err </dev/null >/dev/null 2>&1 &
  fi
  wait_for 30 mariadb-admin ping
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<DBD
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmci
DBD
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 0600 /etc/slurm/slurmdbd.conf   # slurmdbd insists
  alive /run/slurmdbd.pid || /usr/sbin/slurmdbd
  wait_for 60 sacctmgr -n -P list cluster
  say "mariadb + slurmdbd up"
fi

# 6. controller and node daemons (they daemonize and write /run/slurm{ctld,d}.pid); a running
#    cluster is reconfigured instead of started twice
if alive /run/slurmctld.pid; then scontrol reconfigure; else /usr/sbin/slurmctld; fi
wait_for 30 scontrol ping
alive /run/slurmd.pid || /usr/sbin/slurmd
wait_for 30 sh -c '[ "$(sinfo -h -o %t)" = idle ] || [ "$(sinfo -h -o %t)" = mix ] || [ "$(sinfo -h -o %t)" = alloc ]' \
  || { sinfo -R; tail -20 $LOGDIR/slurmctld.log; exit 1; }
say "cluster up: $(sinfo -h -o '%P %t %N cpus=%c gres=%G')"

# 7. smoke test (accounting: the cluster registers itself with the fresh DB in about 4 s)
srun -t 1 hostname >/dev/null
if [ "$ACCT" = 1 ]; then wait_for 30 sh -c 'sacct -n -X -P -o State | grep -q COMPLETED'; fi
say "smoke test ok"
