#!/usr/bin/env bash
# Start or stop a one-node Ray head on a loopback address (tests, and trying Ray on a laptop).
#   launch/ray_local.sh start STATE_DIR   # prints RAY_ADDRESS=... and DASHBOARD=http://...
#   launch/ray_local.sh stop STATE_DIR
# Ports: RAY_PORT (default 6379), RAY_DASHBOARD_PORT (8265); CPUs: RAY_NUM_CPUS (all cores).
# The node address is RAY_NODE_IP (default 127.0.0.2): Ray replaces 127.0.0.1 and localhost by the
# host's outward address, so a head there would talk to itself off the loopback interface.
# The dashboard and job server listen on 127.0.0.1 only; Ray's own GCS/raylet ports listen on
# every interface, so token authentication is on with a fresh token in STATE_DIR/auth_token.
# Clients export the printed RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH. All Ray processes run in one
# new session whose id is kept in STATE_DIR/session; `stop` ends that session only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
action=${1:?usage: ray_local.sh start|stop STATE_DIR}
state=$(mkdir -p "${2:?usage: ray_local.sh start|stop STATE_DIR}" && cd "$2" && pwd)
PY=${DISTSPARSE_PYTHON:-${DISTSPARSE_VENV:-$ROOT/.venv}/bin/python}
RAY="$(dirname "$PY")/ray"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token" RAY_USAGE_STATS_ENABLED=0
# Job entrypoints run `python`: make it the interpreter that has distsparse's dependencies.
export PATH="$(dirname "$PY"):$PATH"
port=${RAY_PORT:-6379}
node_ip=${RAY_NODE_IP:-127.0.0.2}
dashboard=${RAY_DASHBOARD_PORT:-8265}
case $action in
  start)
    # Ray's socket paths must stay short (AF_UNIX limit): keep its temp dir near the root.
    temp=$(mktemp -d /tmp/ray-local.XXXXXX)
    echo "$temp" >"$state/temp_dir"
    (umask 077 && "$PY" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
    setsid -w "$RAY" start --head --node-ip-address "$node_ip" --port "$port" \
      --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" --include-dashboard true \
      ${RAY_NUM_CPUS:+--num-cpus "$RAY_NUM_CPUS"} --temp-dir "$temp" --disable-usage-stats \
      >"$state/start.log" 2>&1 &
    leader=$!
    echo "$leader" >"$state/session"
    wait "$leader" || { cat "$state/start.log" >&2; exit 1; }
    grep -q "Local node IP.*$node_ip" "$state/start.log" || {
      echo "ray_local.sh: Ray did not keep the node address $node_ip:" >&2; grep "node IP" "$state/start.log" >&2; exit 1; }
    echo "RAY_ADDRESS=$node_ip:$port"
    echo "RAY_DASHBOARD=http://127.0.0.1:$dashboard"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    ;;
  stop)
    if [[ -f $state/session ]]; then
      session=$(cat "$state/session")
      members() { ps -eo pid=,sid= | awk -v s="$session" '$2 == s {print $1}'; }
      pids=$(members); [[ -n $pids ]] && kill -TERM $pids 2>/dev/null || true
      for _ in $(seq 20); do [[ -z $(members) ]] && break; sleep 0.5; done
      pids=$(members); [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
      rm -f "$state/session"
    fi
    if [[ -f $state/temp_dir ]]; then rm -rf "$(cat "$state/temp_dir")" "$state/temp_dir"; fi
    ;;
  *) echo "usage: ray_local.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac
