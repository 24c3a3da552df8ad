#!/usr/bin/env bash
# Bring up a two-node SLURM cluster on this machine (`make slurm-up`).
#
# Installs Debian's Slurm and MUNGE (and, for `sacct`, slurmdbd with a MariaDB server) when missing,
# renders slurm.conf.in and slurmdbd.conf.in, starts munged, mariadbd, slurmdbd, slurmctld and one
# slurmd per simulated node (n1, n2), and waits until both nodes answer. Idempotent: a second run
# finds everything running and returns in about a second. When the rendered configuration changed,
# the Slurm daemons this script started are restarted.
#
# Settings (environment):
#   GPT2_SLURM_DIR             state, logs, pid files, rendered configs      [/var/lib/gpt2-slurm]
#   GPT2_SLURM_CPUS            CPUs declared per node                        [max(nproc, 4)]
#   GPT2_SLURM_MEM_MB          memory (MB) declared per node             [min(8192, 35% of RAM)]
#   GPT2_SLURM_GRACE           seconds a preempted job in `low` has to save  [20]
#   GPT2_SLURM_REQUEUE_DELAY   seconds before a requeued job may run again   [30]
#   GPT2_SLURM_ACCOUNTING      1: slurmdbd + MariaDB so `sacct` works; 0: none [1]
#   GPT2_SLURM_PORT            slurmctld port (slurmdbd: +2, MariaDB: 17306) [6817]
#   GPT2_SLURM_TIMEOUT         seconds to wait for the nodes to come up      [60]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
need_root "$HERE/up.sh" "$@"

NPROC=$(nproc)
CPUS=${GPT2_SLURM_CPUS:-$((NPROC > 4 ? NPROC : 4))}
TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# Both nodes together get at most 70% of the machine's memory.
MEM_MB=${GPT2_SLURM_MEM_MB:-$(((TOTAL_MB * 7 / 20 < 8192 ? TOTAL_MB * 7 / 20 : 8192) / 256 * 256))}
GRACE=${GPT2_SLURM_GRACE:-20}
REQUEUE_DELAY=${GPT2_SLURM_REQUEUE_DELAY:-30}
ACCOUNTING=${GPT2_SLURM_ACCOUNTING:-1}
CTLD_PORT=${GPT2_SLURM_PORT:-6817}
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=17306
TIMEOUT=${GPT2_SLURM_TIMEOUT:-60}
HOST=$(hostname -s)
for var in CPUS MEM_MB GRACE REQUEUE_DELAY CTLD_PORT TIMEOUT; do
  [[ ${!var} =~ ^[0-9]+$ ]] || die "GPT2_SLURM_${var/CTLD_/} must be a whole number, got '${!var}'"
done
[[ $ACCOUNTING == 0 || $ACCOUNTING == 1 ]] || die "GPT2_SLURM_ACCOUNTING must be 0 or 1, got '$ACCOUNTING'"
((REQUEUE_DELAY >= 5)) || die "GPT2_SLURM_REQUEUE_DELAY must be at least 5 (Slurm's minimum)"

install_packages() {
  local commands=(munged munge unmunge slurmctld slurmd sinfo sbatch scontrol)
  local packages=(slurm-wlm munge)
  if ((ACCOUNTING)); then
    commands+=(slurmdbd mariadbd mariadb-install-db mariadb)
    packages+=(slurmdbd mariadb-server-core mariadb-client-core)
  fi
  local missing=() cmd
  for cmd in "${commands[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  ((${#missing[@]} == 0)) && return
  command -v apt-get >/dev/null ||
    die "missing ${missing[*]}; this script installs them only with apt-get (Debian, Ubuntu): install ${packages[*]} by hand"
  log "installing ${packages[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  local attempt
  for attempt in 1 2 3; do
    # A second try covers a mirror hiccup or another apt holding the lock.
    if {
      apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=120 "${packages[@]}"
    } >>"$LOG_DIR/apt-install.log" 2>&1; then
      return
    fi
    ((attempt < 3)) && { log "apt-get failed; trying again in 10 s"; sleep 10; }
  done
  die "installing ${packages[*]} failed; see $LOG_DIR/apt-install.log"
}

make_dirs() {
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$GPT2_SLURM_DIR/etc" "$GPT2_SLURM_DIR/state" "$DB_DIR"
  chmod 0700 "$DB_DIR"
  local node
  for node in "${NODES[@]}"; do mkdir -p "$GPT2_SLURM_DIR/spool/$node"; done
  # munged refuses to start unless these belong to munge.
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
  fi
}

add_hosts() {
  # Jobs resolve node names, e.g. a torch.distributed master address of "n1".
  local node missing=()
  for node in "${NODES[@]}"; do
    grep -Eq "^[[:space:]]*127\.0\.0\.1([[:space:]]+[^#[:space:]]+)*[[:space:]]+$node([[:space:]]|#|\$)" /etc/hosts ||
      missing+=("$node")
  done
  if ((${#missing[@]} > 0)); then
    log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
    echo "127.0.0.1 ${missing[*]}" >>/etc/hosts
  fi
}

# Print template $1 with its @VAR@ placeholders filled in.
render() {
  sed -e "s|@HOST@|$HOST|g" -e "s|@DIR@|$GPT2_SLURM_DIR|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@MEM_PER_CPU@|$((MEM_MB / CPUS))|g" -e "s|@GRACE@|$GRACE|g" \
    -e "s|@REQUEUE_DELAY@|$REQUEUE_DELAY|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|${DB_PASS:-}|g" \
    -e "s|@ACCT_TYPE@|$( ((ACCOUNTING)) && echo accounting_storage/slurmdbd || echo accounting_storage/none)|g" \
    "$1"
}

# Render template $1 to $2.new; return 0 when that differs from $2 (then install_config moves it).
render_config() {
  (umask 077 && render "$1" >"$2.new")
  if [[ -f $2 ]] && cmp -s "$2.new" "$2"; then
    rm -f "$2.new"
    return 1
  fi
}

install_config() {
  mv "$1.new" "$1"
  log "wrote $1"
}

write_configs() {
  local changed=()
  if ((ACCOUNTING)); then
    # The database password is made once and kept with the database it belongs to.
    [[ -s $DB_DIR/password ]] || (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$DB_DIR/password")
    DB_PASS=$(<"$DB_DIR/password")
    render_config "$HERE/slurmdbd.conf.in" "$DBD_CONF" && changed+=("$DBD_CONF")
  fi
  render_config "$HERE/slurm.conf.in" "$CONF" && changed+=("$CONF")
  if ((${#changed[@]} > 0)); then
    # Stop before the new file replaces the old one: if this run is interrupted, the next one
    # still sees the change and restarts the daemons.
    local name file
    if our_pid slurmctld >/dev/null || our_pid slurmd-n1 >/dev/null || our_pid slurmd-n2 >/dev/null; then
      log "configuration changed; restarting the Slurm daemons this script started"
    fi
    for name in slurmd-n2 slurmd-n1 slurmctld slurmdbd; do stop_daemon "$name"; done
    for file in "${changed[@]}"; do install_config "$file"; done
  fi
  chmod 0644 "$CONF"
  if [[ -f $DBD_CONF ]]; then chmod 0600 "$DBD_CONF"; fi
  # Point the standard location at it, so sinfo, sbatch and submitit need no SLURM_CONF. Never
  # replace a configuration this script did not write.
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]] && return
  if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]] && ! grep -qF "$CONF_MARKER" "$SYSTEM_CONF" 2>/dev/null; then
    die "$SYSTEM_CONF exists and this script did not write it. Move it away, or keep it and use this
  cluster with SLURM_CONF=$CONF in the environment."
  fi
  ln -sfn "$CONF" "$SYSTEM_CONF"
  log "linked $SYSTEM_CONF -> $CONF"
}

# Wait until daemon $1 has written its pid file and runs; $2 is the log to name if it does not.
wait_for_pid_file() {
  local i
  for ((i = 0; i < 150; i++)); do
    our_pid "$1" >/dev/null && return
    sleep 0.1
  done
  die "$1 did not start; see $2"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  if munge_works; then
    our_pid munged >/dev/null || log "munged already runs (not started by this script; left alone)"
    return
  fi
  rm -f "$(pid_file munged)"
  log "starting munged"
  # --force: a munged that died uncleanly leaves its socket behind (none works: checked above).
  runuser -u munge -- /usr/sbin/munged --force
  local i
  for ((i = 0; i < 100; i++)); do
    if munge_works && [[ -s /run/munge/munged.pid ]]; then
      cp /run/munge/munged.pid "$(pid_file munged)"
      our_pid munged >/dev/null && return
    fi
    sleep 0.1
  done
  die "munged did not start; see /var/log/munge/munged.log"
}

db() { mariadb --no-defaults -S "$DB_DIR/mysqld.sock" -u root "$@"; }

start_mariadbd() {
  our_pid mariadbd >/dev/null && return
  if [[ ! -d $DB_DIR/data/mysql ]]; then
    log "creating the accounting database in $DB_DIR/data"
    rm -rf "$DB_DIR/data"
    mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR/data" --skip-test-db \
      >"$LOG_DIR/mariadb-install-db.log" 2>&1 ||
      die "mariadb-install-db failed; see $LOG_DIR/mariadb-install-db.log"
  fi
  log "starting mariadbd (127.0.0.1:$DB_PORT)"
  # Options on the command line only (--no-defaults): a MariaDB installed for other uses is not touched.
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DB_DIR/data" \
    --socket="$DB_DIR/mysqld.sock" --pid-file="$(pid_file mariadbd)" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --skip-name-resolve --innodb-lock-wait-timeout=900 \
    --log-error="$LOG_DIR/mariadbd.log" </dev/null >>"$LOG_DIR/mariadbd.log" 2>&1 &
  local i
  for ((i = 0; i < 300; i++)); do
    db -e 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  db -e 'SELECT 1' >/dev/null 2>&1 || die "mariadbd did not start; see $LOG_DIR/mariadbd.log"
  wait_for_pid_file mariadbd "$LOG_DIR/mariadbd.log"
  db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    die "could not create the accounting database user; see $LOG_DIR/mariadbd.log"
}

start_slurmdbd() {
  our_pid slurmdbd >/dev/null && return
  log "starting slurmdbd"
  # slurmdbd has no -f: it reads slurmdbd.conf from the directory of SLURM_CONF.
  SLURM_CONF=$CONF slurmdbd || die "slurmdbd failed to start; see $LOG_DIR/slurmdbd.log"
  wait_for_pid_file slurmdbd "$LOG_DIR/slurmdbd.log"
  local i
  for ((i = 0; i < 150; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null && return
    sleep 0.1
  done
  die "slurmdbd does not listen on 127.0.0.1:$DBD_PORT; see $LOG_DIR/slurmdbd.log"
}

start_slurmctld() {
  our_pid slurmctld >/dev/null && return
  log "starting slurmctld"
  slurmctld -f "$CONF" || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
  wait_for_pid_file slurmctld "$LOG_DIR/slurmctld.log"
}

start_slurmd() {
  local node=$1
  our_pid "slurmd-$node" >/dev/null && return
  log "starting slurmd for $node"
  slurmd -f "$CONF" -N "$node" || die "slurmd -N $node failed to start; see $LOG_DIR/slurmd-$node.log"
  wait_for_pid_file "slurmd-$node" "$LOG_DIR/slurmd-$node.log"
}

wait_for_nodes() {
  # Up means every node answers: idle, or busy with jobs. A node still registering shows "idle*"
  # or "down*". One that answers but is drained or down (say, a job's processes outlived a
  # restart) is resumed: on this cluster nobody else drains nodes on purpose.
  local deadline=$((SECONDS + TIMEOUT)) states="" node state resumed=" "
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || true
    if [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states") == "${#NODES[@]}" ]] &&
      [[ $(wc -l <<<"$states") == "${#NODES[@]}" ]]; then
      return
    fi
    while read -r node state; do
      if [[ $state =~ ^(drain|drained|draining|down)$ && $resumed != *" $node "* ]]; then
        log "$node is $state ($(sinfo -h -n "$node" -N -o '%E' | head -1)); resuming it"
        scontrol update NodeName="$node" State=RESUME || true
        resumed+="$node "
      fi
    done <<<"$states"
    sleep 0.5
  done
  {
    echo "[slurm-local] error: the nodes did not come up within ${TIMEOUT}s. sinfo says:"
    sinfo -N -o '%N %T %E' || true
    echo "[slurm-local] logs: $LOG_DIR/slurmctld.log $LOG_DIR/slurmd-n1.log $LOG_DIR/slurmd-n2.log"
  } >&2
  exit 1
}

mkdir -p "$LOG_DIR"
install_packages
make_dirs
add_hosts
write_configs
start_munged
if ((ACCOUNTING)); then
  start_mariadbd
  start_slurmdbd
else
  stop_daemon slurmdbd
  stop_daemon mariadbd
fi
start_slurmctld
for node in "${NODES[@]}"; do start_slurmd "$node"; done
wait_for_nodes

log "cluster up: nodes n1 n2 ($CPUS CPUs, $MEM_MB MB each); partitions low (default; a preempted job gets"
log "  ${GRACE}s of GraceTime, then is requeued) and high (preempts low). Files: $GPT2_SLURM_DIR"
printf '  %-45s %s\n' \
  "sinfo; squeue$( ((ACCOUNTING)) && echo '; sacct')" "the cluster and its jobs" \
  "make submit EXP=debug_local EXECUTOR=slurm" "run the toolkit's debug sweep on it" \
  "sbatch -p high --wrap 'sleep 30'" "preempt whatever runs in low" \
  "make slurm-down" "stop the daemons this script started"
