# Sourced by the perf scenario scripts: starts and stops the peers measured side by side.
#
#   torpor   `torpor serve --shards N` (pinned to CPU 0 with one shard, or unpinned) plus an
#            echo runner pinned to CPU 1, and one actor created for the load to address
#   nginx    the Debian package (pinned version below), ONE worker, pinned to CPU 0,
#            reverse-proxying WebSockets to ws-echo
#   ws-echo  the tokio-tungstenite echo server (src/bin/ws_echo.rs), pinned to CPU 1: the
#            backend behind nginx, and the "direct" peer
#   fws-echo the fastwebsockets echo server (perf/fws-echo), pinned to CPU 1: the faster
#            backend, behind a second nginx ("nginx-fws") and direct ("direct-fws")
#
# Each start_* function takes a PREFIX and sets ${PREFIX}_PORT, ${PREFIX}_PID (the process to
# measure: torpor itself, nginx's worker, ws-echo) and more (see each function). Everything
# started here lives in one temp dir and is stopped by the EXIT trap (only the PIDs started
# here are signalled). Expects the current directory to be the repository root and the
# release binaries built.

# The nginx measured: Debian bookworm's package. A security update may replace this exact
# revision in the archive; then the newest 1.22.1 revision is installed and `nginx -v` in the
# output says which one ran.
NGINX_PIN_VERSION="1.22.1-9+deb12u11"

PEERS_TMP=$(mktemp -d /tmp/torpor-perf.XXXXXX)
chmod 755 "$PEERS_TMP"
PEERS_PIDS=()

peers_cleanup() {
  local p
  for p in "${PEERS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PEERS_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$PEERS_TMP"
}
trap peers_cleanup EXIT
trap 'exit 130' INT TERM

# Prints a command as it is run (the scripts must show the exact commands).
peers_show() { printf '+ %s\n' "$*"; }

# A free TCP port on 127.0.0.1.
peers_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

peers_wait_port() { # port [tries]
  local i
  for i in $(seq "${2:-200}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "peers: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# Lets this shell and its children open many sockets (idle runs hold 50k+). Root may raise
# the hard limit up to fs.nr_open.
peers_raise_nofile() {
  local want
  want=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
  ((want > 1048576)) && want=1048576
  ulimit -Hn "$want" 2>/dev/null || true
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  echo "open-file limit: $(ulimit -n)"
}

# Installs nginx from Debian when it is missing.
nginx_ensure_installed() {
  command -v nginx >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  peers_show apt-get install -y --no-install-recommends "nginx=$NGINX_PIN_VERSION"
  if ! apt-get install -y --no-install-recommends "nginx=$NGINX_PIN_VERSION" >"$PEERS_TMP/apt.log" 2>&1; then
    apt-get update >>"$PEERS_TMP/apt.log" 2>&1 || true
    if ! apt-get install -y --no-install-recommends "nginx=$NGINX_PIN_VERSION" >>"$PEERS_TMP/apt.log" 2>&1; then
      echo "peers: nginx=$NGINX_PIN_VERSION is not in the archive any more; installing the candidate" >&2
      apt-cache policy nginx >&2
      apt-get install -y --no-install-recommends nginx >>"$PEERS_TMP/apt.log" 2>&1 || {
        cat "$PEERS_TMP/apt.log" >&2
        return 1
      }
    fi
  fi
  # The package may start a system nginx; it is not ours to keep running on port 80 but it
  # is not ours to stop either, so only say so.
  if pgrep -x nginx >/dev/null; then echo "peers: note: a system nginx is running as well" >&2; fi
}

# start_wsecho PREFIX CPU: ws-echo on a free port, pinned to CPU.
# Sets PREFIX_PORT, PREFIX_PID.
start_wsecho() {
  local pre=$1 cpu=$2 port pid
  port=$(peers_free_port)
  peers_show taskset -c "$cpu" ./target/release/ws-echo --listen "127.0.0.1:$port" --threads 1
  taskset -c "$cpu" ./target/release/ws-echo --listen "127.0.0.1:$port" --threads 1 \
    >"$PEERS_TMP/$pre-ws-echo.log" 2>&1 &
  pid=$!
  PEERS_PIDS+=("$pid")
  peers_wait_port "$port"
  printf -v "${pre}_PORT" %s "$port"
  printf -v "${pre}_PID" %s "$pid"
}

# start_fwsecho PREFIX CPU: the fastwebsockets echo server (perf/fws-echo, built by
# perf_build) on a free port, pinned to CPU. Sets PREFIX_PORT, PREFIX_PID.
start_fwsecho() {
  local pre=$1 cpu=$2 port pid bin=perf/fws-echo/target/release/fws-echo
  port=$(peers_free_port)
  peers_show taskset -c "$cpu" "$bin" --listen "127.0.0.1:$port"
  taskset -c "$cpu" "$bin" --listen "127.0.0.1:$port" >"$PEERS_TMP/$pre-fws-echo.log" 2>&1 &
  pid=$!
  PEERS_PIDS+=("$pid")
  peers_wait_port "$port"
  printf -v "${pre}_PORT" %s "$port"
  printf -v "${pre}_PID" %s "$pid"
}

# start_nginx PREFIX UPSTREAM_PORT CPU [SPREAD]: nginx with one worker on a free port,
# pinned to CPU, proxying every path to 127.0.0.1:UPSTREAM_PORT. With SPREAD=1 the upstream
# connections come from four loopback source addresses (for tens of thousands of idle
# connections: one source address has only ~28k ephemeral ports).
# Sets PREFIX_PORT, PREFIX_PID (the worker), PREFIX_MASTER, PREFIX_CONF.
nginx_write_conf() { # dir listen_port upstream_port spread
  local dir=$1 port=$2 up=$3 spread=${4:-0} bind_map="" bind=""
  if [[ $spread == 1 ]]; then
    bind_map='    split_clients "${remote_addr}:${remote_port}" $upstream_source {
        25% 127.0.1.1; 25% 127.0.1.2; 25% 127.0.1.3; * 127.0.1.4;
    }'
    bind='            proxy_bind $upstream_source;'
  fi
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $(ulimit -Hn);
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 65535;
}

http {
    access_log off;
    tcp_nodelay on;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;

    upstream ws_echo {
        server 127.0.0.1:$up;
        keepalive 64;
    }
$bind_map
    server {
        listen 127.0.0.1:$port backlog=65535;
        location / {
            proxy_pass http://ws_echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host \$host;
            proxy_buffering off;
            proxy_buffer_size 64k;
            # Required alongside a 64k proxy_buffer_size; an upgraded connection uses only
            # proxy_buffer_size.
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
$bind
        }
    }
}
EOF
}

start_nginx() {
  local pre=$1 up=$2 cpu=$3 spread=${4:-0} port dir master worker=""
  nginx_ensure_installed
  port=$(peers_free_port)
  dir="$PEERS_TMP/$pre-nginx"
  nginx_write_conf "$dir" "$port" "$up" "$spread"
  nginx -t -q -p "$dir" -c "$dir/nginx.conf" 2>"$dir/test.log" || {
    cat "$dir/test.log" >&2
    return 1
  }
  peers_show taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf"
  taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  master=$!
  PEERS_PIDS+=("$master")
  peers_wait_port "$port"
  for _ in $(seq 100); do
    worker=$(pgrep -P "$master" | head -1) && [[ -n $worker ]] && break
    sleep 0.05
  done
  [[ -n $worker ]] || {
    echo "peers: nginx has no worker" >&2
    return 1
  }
  printf -v "${pre}_PORT" %s "$port"
  printf -v "${pre}_PID" %s "$worker"
  printf -v "${pre}_MASTER" %s "$master"
  printf -v "${pre}_CONF" %s "$dir/nginx.conf"
}

# start_torpor PREFIX SHARDS CPU RUNNER_CPU: torpor on a free port with a fresh data dir,
# pinned to CPU ("" = unpinned), an echo runner pinned to RUNNER_CPU, and one actor.
# Sets PREFIX_PORT, PREFIX_PID, PREFIX_RUNNER, PREFIX_ACTOR. PERF_TORPOR_BIN names another
# torpor binary (perf/ab.sh: an earlier revision's).
start_torpor() {
  local pre=$1 shards=$2 cpu=$3 rcpu=$4 port pid runner data pin=() wrap=() actor
  local bin=${PERF_TORPOR_BIN:-./target/release/torpor}
  port=$(peers_free_port)
  data="$PEERS_TMP/$pre-data"
  mkdir -p "$data"
  [[ -n $cpu ]] && pin=(taskset -c "$cpu")
  # PERF_TORPOR_WRAP runs torpor under a tool (profile.sh: valgrind); not TORPOR_*, which
  # torpor itself reads as configuration.
  read -r -a wrap <<<"${PERF_TORPOR_WRAP:-}"
  peers_show "${pin[@]}" "${wrap[@]}" "$bin" serve --listen "127.0.0.1:$port" --shards "$shards" --data-dir "$data"
  "${pin[@]}" "${wrap[@]}" "$bin" serve --listen "127.0.0.1:$port" \
    --shards "$shards" --data-dir "$data" >"$PEERS_TMP/$pre-torpor.log" 2>&1 &
  pid=$!
  PEERS_PIDS+=("$pid")
  for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
  peers_show taskset -c "$rcpu" ./target/release/echo-runner --endpoint "http://127.0.0.1:$port"
  taskset -c "$rcpu" ./target/release/echo-runner --endpoint "http://127.0.0.1:$port" \
    >"$PEERS_TMP/$pre-runner.log" 2>&1 &
  runner=$!
  PEERS_PIDS+=("$runner")
  for _ in $(seq 1200); do
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break
    sleep 0.05
  done
  actor=$(curl -sf -X POST "http://127.0.0.1:$port/actors?namespace=default" \
    -H 'content-type: application/json' \
    -d '{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["actor"]["actor_id"])') || {
    echo "peers: could not create an actor on torpor :$port" >&2
    cat "$PEERS_TMP/$pre-torpor.log" >&2
    return 1
  }
  printf -v "${pre}_PORT" %s "$port"
  printf -v "${pre}_PID" %s "$pid"
  printf -v "${pre}_RUNNER" %s "$runner"
  printf -v "${pre}_ACTOR" %s "$actor"
}

# stop_peer PID...: stops peers started above (nginx: pass the master).
stop_peer() {
  local p
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
}
