# shellcheck shell=bash
# Helpers shared by deploy/local/{test,up,betting}: tool installation and
# private PostgreSQL / Redis instances (own ports, own socket dirs, so they
# never clash with a system-wide server or with each other).
#
# Source it; do not execute it. Callers are expected to `set -euo pipefail`.

# Repository root, derived from this file's location so callers can run from anywhere.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ROOT

# Pinned so lint results do not drift between machines.
BUF_VERSION=1.75.0

# Set by start_postgres / start_redis: 1 if this shell started the server,
# 0 if it found one already running (callers must then leave it alone).
PG_STARTED=0
REDIS_STARTED=0

_apt_updated=0

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run a command as root: directly if we are root, else through sudo if there is one.
_as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root or sudo to run: $*"
  fi
}

# apt-get install, running `apt-get update` at most once per shell.
_apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  if [[ $_apt_updated -eq 0 ]]; then
    _as_root apt-get update
    _apt_updated=1
  fi
  _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# Highest-versioned /usr/lib/postgresql/*/bin holding the server binaries; empty if none.
_find_pg_bin() {
  local d best=""
  while IFS= read -r d; do
    if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then
      best=$d
    fi
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
  printf '%s' "$best"
}

_ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    log "==> installing redis-server"
    _apt_install redis-server
  fi
}

_ensure_postgres() {
  PG_BIN="$(_find_pg_bin)"
  if [[ -z $PG_BIN ]]; then
    log "==> installing postgresql"
    _apt_install postgresql
    PG_BIN="$(_find_pg_bin)"
    [[ -n $PG_BIN ]] || die "postgresql installed but no initdb/pg_ctl/postgres under /usr/lib/postgresql/*/bin"
  fi
  export PG_BIN
}

_ensure_buf() {
  local local_bin="$ROOT/.local/npm/node_modules/.bin"
  # A previous fallback install: just put it back on PATH.
  if ! command -v buf >/dev/null 2>&1 && [[ -x $local_bin/buf ]]; then
    export PATH="$local_bin:$PATH"
  fi
  command -v buf >/dev/null 2>&1 && return 0
  command -v npm >/dev/null 2>&1 || die "buf not found and npm is not available to install it"
  log "==> installing buf $BUF_VERSION"
  if ! npm install -g "@bufbuild/buf@$BUF_VERSION"; then
    # No permission for the global prefix: install into the (git-ignored) .local instead.
    log "global npm install failed; installing buf under $ROOT/.local/npm"
    mkdir -p "$ROOT/.local/npm"
    npm install --prefix "$ROOT/.local/npm" "@bufbuild/buf@$BUF_VERSION"
    export PATH="$local_bin:$PATH"
  fi
  hash -r
  command -v buf >/dev/null 2>&1 || die "buf still not on PATH after installing it"
}

# cargo-deny, from crates.io when missing. Returns 1 (after saying why)
# rather than dying: the caller skips the check with a clear message.
_ensure_cargo_deny() {
  cargo deny --version >/dev/null 2>&1 && return 0
  log "==> installing cargo-deny (cargo install --locked cargo-deny)"
  if ! cargo install --locked cargo-deny >&2; then
    log "cargo install cargo-deny failed"
    return 1
  fi
  cargo deny --version >/dev/null 2>&1
}

# ensure_tools [redis] [postgres] [buf]
# Installs only what is missing. No arguments means all of them. Exports PG_BIN.
ensure_tools() {
  local want=("$@") t
  [[ ${#want[@]} -gt 0 ]] || want=(redis postgres buf)
  command -v python3 >/dev/null 2>&1 || die "python3 is required (free_port)"
  for t in "${want[@]}"; do
    case $t in
      redis) _ensure_redis ;;
      postgres) _ensure_postgres ;;
      buf) _ensure_buf ;;
      *) die "ensure_tools: unknown tool '$t'" ;;
    esac
  done
}

# betting_binary WHAT — the `betting` binary the checks run: $BETTING_BIN,
# else the newest current build of target/{debug,release}/betting (one that
# has the `health` command), else a fresh debug build (WHAT says what for).
betting_binary() {
  local candidate best="" target=${CARGO_TARGET_DIR:-$ROOT/target}
  if [[ -n ${BETTING_BIN:-} ]]; then
    printf '%s' "$BETTING_BIN"
    return 0
  fi
  for candidate in "$target/debug/betting" "$target/release/betting"; do
    [[ -x $candidate ]] || continue
    "$candidate" health --help >/dev/null 2>&1 || continue
    if [[ -z $best || $candidate -nt $best ]]; then best=$candidate; fi
  done
  if [[ -z $best ]]; then
    log "==> cargo build -p betting-cli (for $1)"
    (cd "$ROOT" && cargo build --locked -p betting-cli >&2)
    best=$target/debug/betting
  fi
  printf '%s' "$best"
}

# Print a TCP port on 127.0.0.1 that is free right now, below the kernel's
# ephemeral range: a port of that range may be taken by any client's
# outgoing connection before the server given it binds
# (services/chaos/src/ports.rs says more).
free_port() {
  python3 "$ROOT/deploy/ports.py"
}

# initdb and postgres refuse to run as root, so as root they run as the
# `postgres` OS user; otherwise as the current user.
_as_pg() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# As root: make sure the postgres OS user exists, owns DIR and can reach it.
_prepare_pg_dir() {
  local dir=$1 d
  if [[ $EUID -ne 0 ]]; then
    return 0
  fi
  if ! id -u postgres >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
  fi
  chown postgres: "$dir"
  # Every ancestor must be traversable, or postgres cannot reach its data dir
  # (mktemp dirs and home directories are often 0700).
  d=$dir
  while [[ $d != / ]]; do
    d=$(dirname "$d")
    runuser -u postgres -- test -x "$d" ||
      die "user postgres cannot traverse $d (needed to reach $dir); chmod o+x it or use another directory"
  done
}

# start_postgres DIR PORT [extra postgres args, e.g. -c fsync=off ...]
# Cluster in DIR/pg, unix socket in DIR, log in DIR/pg.log, TCP on 127.0.0.1:PORT only.
# Reuses the cluster if it is already running (PG_STARTED=0), else PG_STARTED=1.
start_postgres() {
  local dir=$1 port=$2
  shift 2
  [[ -n ${PG_BIN:-} ]] || _ensure_postgres
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  _prepare_pg_dir "$dir"

  # `cd /` first: as the postgres user the caller's cwd may be unreadable (e.g. /root).
  if [[ ! -f $dir/pg/PG_VERSION ]]; then
    # Trust auth is fine: it only listens on loopback and a private socket dir.
    (cd / && _as_pg "$PG_BIN/initdb" -D "$dir/pg" --auth=trust --username=postgres \
      --encoding=UTF8 --locale=C) >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      die "initdb failed in $dir/pg"
    }
  fi

  PG_STARTED=0
  if _as_pg "$PG_BIN/pg_ctl" -D "$dir/pg" status >/dev/null 2>&1; then
    # Line 4 of postmaster.pid is the port the running postmaster listens on.
    local running_port
    running_port=$(sed -n 4p "$dir/pg/postmaster.pid" 2>/dev/null || true)
    [[ $running_port == "$port" ]] ||
      die "postgres in $dir/pg is already running on port ${running_port:-?}, not $port; stop it first"
    log "postgres already running in $dir/pg on port $port; reusing it"
  else
    # pg_ctl passes -o through /bin/sh, so every word is shell-quoted.
    local opts
    opts=$(printf '%q ' -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 -c max_connections=300 "$@")
    # Set before starting: even a timed-out start may leave a postmaster to clean up.
    # shellcheck disable=SC2034 # read by the callers
    PG_STARTED=1
    # -w -t 30: pg_ctl waits (bounded) for "ready" and notices a postmaster that died.
    if ! (cd / && _as_pg "$PG_BIN/pg_ctl" -D "$dir/pg" -l "$dir/pg.log" -o "$opts" -w -t 30 start) >/dev/null; then
      log "postgres in $dir/pg failed to start on 127.0.0.1:$port; last log lines:"
      tail -n 30 "$dir/pg.log" >&2 || true
      return 1
    fi
  fi

  # Confirm over TCP as clients will connect (bounded, like everything here).
  local deadline=$((SECONDS + 10))
  while ((SECONDS < deadline)); do
    if "$PG_BIN/pg_isready" -q -t 2 -h 127.0.0.1 -p "$port" -U postgres; then
      return 0
    fi
    sleep 0.5
  done
  log "postgres in $dir/pg not accepting TCP connections on 127.0.0.1:$port; last log lines:"
  tail -n 30 "$dir/pg.log" >&2 || true
  return 1
}

# stop_postgres DIR — fast shutdown; fine if it is not running.
stop_postgres() {
  local dir=$1
  [[ -f $dir/pg/PG_VERSION ]] || return 0
  [[ -n ${PG_BIN:-} ]] || PG_BIN="$(_find_pg_bin)"
  [[ -n $PG_BIN ]] || return 0
  (cd / && _as_pg "$PG_BIN/pg_ctl" -D "$dir/pg" -m fast -w -t 30 stop) >/dev/null 2>&1 || true
}

# redis-cli against PORT on loopback. Bounded: against something that is not
# Redis (or a wedged Redis) it would otherwise wait forever for a reply.
_redis_cli() {
  local port=$1
  shift
  timeout 3 redis-cli -h 127.0.0.1 -p "$port" "$@"
}

# start_redis DIR PORT — loopback only, no persistence, daemonized (pidfile/log in DIR).
# Reuses a Redis already answering on PORT (REDIS_STARTED=0), else REDIS_STARTED=1.
start_redis() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  REDIS_STARTED=0
  if [[ $(_redis_cli "$port" ping 2>/dev/null) == PONG ]]; then
    log "redis already answering on 127.0.0.1:$port; reusing it"
    return 0
  fi
  # shellcheck disable=SC2034 # read by the callers
  REDIS_STARTED=1
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" ||
    die "redis-server failed to start; see $dir/redis.log"

  # Daemonized startup errors (e.g. port taken) only show up here, so wait bounded.
  local deadline=$((SECONDS + 10))
  while ((SECONDS < deadline)); do
    if [[ $(_redis_cli "$port" ping 2>/dev/null) == PONG ]]; then
      return 0
    fi
    sleep 0.25
  done
  log "redis not answering on 127.0.0.1:$port after 10 s; last log lines:"
  tail -n 30 "$dir/redis.log" >&2 || true
  return 1
}

# stop_redis DIR PORT — shutdown without saving, else kill the pidfile's process.
stop_redis() {
  local dir=$1 port=$2 pid="" i
  [[ -f $dir/redis.pid ]] && pid=$(<"$dir/redis.pid")
  _redis_cli "$port" shutdown nosave >/dev/null 2>&1 || true
  [[ -n $pid ]] || return 0
  # Wait for it to exit so the caller can safely delete DIR afterwards.
  for ((i = 0; i < 20; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  kill "$pid" 2>/dev/null || true
}

# run_child CMD... — run CMD and return its exit status, such that INT/TERM
# stop it promptly and then the caller's traps (cleanup) run.
run_child() {
  # With a terminal: plain foreground. CMD keeps the terminal (in a background
  # process group anything touching it, e.g. psql, is stopped by SIGTTOU) and
  # Ctrl-C reaches CMD and all its children directly.
  if (: </dev/tty) 2>/dev/null; then
    local st=0
    "$@" || st=$?
    return "$st"
  fi
  # Without one (CI, supervisors) signals come from `kill`, often to this
  # script alone, and bash defers traps until a foreground child exits: the
  # whole test run could finish first, and cargo's children never see the
  # signal. So run CMD in its own process group, pass INT/TERM on to the
  # whole group at once, and exit 128+N (via the EXIT trap) once it is gone.
  local pid status=0 sig="" saved
  saved=$(trap -p INT TERM)
  set -m # job control: the background job gets its own process group
  "$@" &
  pid=$!
  set +m
  trap 'sig=INT; kill -INT -- "-$pid" 2>/dev/null || true' INT
  trap 'sig=TERM; kill -TERM -- "-$pid" 2>/dev/null || true' TERM
  # `wait` returns early when a trapped signal arrives; keep waiting until CMD
  # has really exited, then collect its status (bash remembers it).
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  wait "$pid" || status=$?
  trap - INT TERM
  eval "$saved"
  case $sig in
    INT) exit 130 ;;
    TERM) exit 143 ;;
    *) return "$status" ;;
  esac
}
