#!/usr/bin/env bash
# Stop the cluster started by slurm/ci_up.sh, by PID files only (never by process name).
# --purge also drops the accounting DB and wipes job state and logs (job ids restart at 1).
set -uo pipefail
alive() {  # a daemon orphaned to PID 1 lingers as a zombie for a while: count that as gone
  local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  case "$st" in Z*) return 1;; *) return 0;; esac
}
stop_pidfile() {  # stop_pidfile <pidfile> <name>
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f"); alive "$pid" || { rm -f "$f"; return 0; }
  kill "$pid"
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && { echo "$2 ($pid) still alive, SIGKILL"; kill -9 "$pid"; }
  rm -f "$f"
}
if command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop_pidfile /run/slurmd.pid slurmd
stop_pidfile /run/slurmctld.pid slurmctld
if [ "${1:-}" = --purge ] && [ -f /run/slurmdbd.pid ] && command -v mariadb >/dev/null; then
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" || true
fi
stop_pidfile /run/slurmdbd.pid slurmdbd
if [ -f /run/mysqld/mysqld.pid ]; then mariadb-admin shutdown 2>/dev/null || stop_pidfile /run/mysqld/mysqld.pid mariadbd; fi
stop_pidfile /run/munge/munged.pid munged
if [ "${1:-}" = --purge ]; then
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* /var/log/slurm/*
fi
echo "slurm-ci: stopped"
