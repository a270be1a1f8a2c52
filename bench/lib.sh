# shellcheck shell=bash
# Shared by the bench scripts: the tools they need, the release build, waiting for an idle
# machine and for a port, and the clean-up of a run. The caller sets ROOT, BENCH, OUT, TOOLS,
# PG_BIN, IDLE_WAIT and defines say/die before sourcing this file.

apt_install() {
  local pkg=$1
  if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq >/dev/null 2>&1 || true
  fi
  apt-cache policy "$pkg" | grep -q 'Candidate: [0-9]' || die "no apt candidate for $pkg"
  say "installing $pkg (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null || die "apt-get install $pkg failed"
}

# Installs what is missing; sets OHA, WRK and NGINX.
bench_tools() {
  command -v nginx >/dev/null || apt_install nginx
  command -v wrk >/dev/null || apt_install wrk
  command -v python3 >/dev/null || die "python3 is required"
  command -v pgrep >/dev/null || apt_install procps
  OHA=$(command -v oha || true)
  if [[ -z "$OHA" ]]; then
    OHA=$TOOLS/bin/oha
    if [[ ! -x "$OHA" ]]; then
      say "installing oha (cargo install oha --locked, one-time, several minutes on 2 cores)"
      cargo install oha --locked --root "$TOOLS" >"$BENCH/.oha-install.log" 2>&1 \
        || die "cargo install oha failed (see bench/.oha-install.log)"
    fi
  fi
  WRK=$(command -v wrk)
  NGINX=$(command -v nginx)
}

# Builds the release binary unless told not to (BENCH_SKIP_BUILD=1, PROMPTGATE_BIN).
bench_build() {
  cd "$ROOT"
  if [[ "${BENCH_SKIP_BUILD:-0}" != 1 && -z "${PROMPTGATE_BIN:-}" ]]; then
    say "cargo build --release"
    cargo build --release --quiet --bin promptgate || die "cargo build --release failed"
  fi
  [[ -x "$PG_BIN" ]] || die "no promptgate binary at $PG_BIN"
}

# Idle = no compiler process and under 15% machine CPU, for 10 s in a row. Another
# engineer's build on the same 2 cores would otherwise distort every figure.
# Sets IDLE to a description for the report.
bench_wait_idle() {
  compiling() { pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null || pgrep -x cc1 >/dev/null; }
  cpu_pct() {  # machine CPU use over 1 s, in percent
    local a b
    read -r _ a1 a2 a3 a4 a5 a6 a7 a8 _ < /proc/stat
    sleep 1
    read -r _ b1 b2 b3 b4 b5 b6 b7 b8 _ < /proc/stat
    a=$((a1+a2+a3+a4+a5+a6+a7+a8)); b=$((b1+b2+b3+b4+b5+b6+b7+b8))
    echo $(( 100 * ((b - a) - ((b4 + b5) - (a4 + a5))) / (b - a > 0 ? b - a : 1) ))
  }
  IDLE="yes"
  quiet=0; waited=0; told=0
  while (( quiet < 10 )); do
    if compiling || (( $(cpu_pct) >= 15 )); then
      quiet=0
      if (( ! told )); then
        say "machine busy (build or other load); waiting up to ${IDLE_WAIT}s for 10 quiet seconds"; told=1
      fi
      (( waited >= IDLE_WAIT )) && break
      sleep 2; waited=$((waited + 3))
    else
      quiet=$((quiet + 1)); waited=$((waited + 1))
    fi
  done
  if (( quiet < 10 )); then
    IDLE="no (still busy after ${IDLE_WAIT}s wait)"; say "WARNING: machine not idle, measuring anyway"
  elif (( waited > 10 )); then
    IDLE="yes (after waiting ${waited}s)"
  fi
}

# Waits until process `pid` (`name`) listens on 127.0.0.1:`port`, at most 10 s.
wait_port() {  # port pid name
  for _ in $(seq 100); do
    kill -0 "$2" 2>/dev/null || die "$3 exited during start-up"
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$3 is not listening on 127.0.0.1:$1 after 10s"
}

# The run's processes and scratch folder: every server and load generator goes into PIDS,
# TMP is the scratch folder, KEEP_LOGS lists "file-in-TMP:name-in-OUT/logs" pairs to keep.
# `bench_traps` makes every exit (normal, error, Ctrl-C, TERM) stop the processes (TERM,
# up to 5 s, then KILL), copy those logs and remove TMP.
PIDS=()
TMP=""
KEEP_LOGS=()
bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid pair
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$TMP" && -d "$TMP" ]]; then
    mkdir -p "$OUT/logs"
    for pair in "${KEEP_LOGS[@]}"; do
      cp -f "$TMP/${pair%%:*}" "$OUT/logs/${pair#*:}" 2>/dev/null || true
    done
    rm -rf "$TMP"
  fi
  [[ $rc -eq 0 ]] || say "failed (exit $rc)"
  exit "$rc"
}
bench_traps() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Removes a pid from PIDS (a step that ended by itself).
drop_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# bench_py_step SCRIPT TIMEOUT-SECONDS WHAT ARGS...: runs a python step in the
# background + wait, so Ctrl-C/TERM reach the trap at once; cleanup then stops
# it like the servers.
bench_py_step() {
  local script=$1 t=$2 what=$3; shift 3
  timeout "$t" python3 "$script" "$@" &
  local pid=$!; PIDS=("$pid" "${PIDS[@]}")
  wait "$pid" || die "$what failed"
  drop_pid "$pid"
}

# Dies unless every port given is free on 127.0.0.1.
bench_ports_free() {
  local p
  for p in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is already in use"; fi
  done
}
