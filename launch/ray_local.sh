#!/usr/bin/env bash
# Start or stop Ray nodes on loopback addresses (tests, simulated clusters, trying Ray on a laptop).
#   launch/ray_local.sh start STATE_DIR          # a head; prints RAY_ADDRESS=... and DASHBOARD=...
#   launch/ray_local.sh join STATE_DIR ADDRESS   # a worker node joining the head at ADDRESS
#   launch/ray_local.sh stop STATE_DIR           # ends that node's processes (TERM, 3 s, KILL)
#   launch/ray_local.sh kill STATE_DIR           # SIGKILL, no clean shutdown: a node failure
# Ports: RAY_PORT (head, default 6379), RAY_DASHBOARD_PORT (head, 8265), RAY_CLIENT_PORT (head,
# 10001), RAY_AGENT_PORT (the node's dashboard agent, 52365: give each node on one host its own);
# CPUs: RAY_NUM_CPUS (all cores).
# The node address is RAY_NODE_IP (default 127.0.0.2 for a head, 127.0.0.3 for a worker node):
# Ray replaces 127.0.0.1 and localhost by the host's outward address, so a node there would talk
# to the others off the loopback interface. The dashboard and job server listen on 127.0.0.1
# only; Ray's own GCS/raylet ports listen on every interface, so token authentication is on: a
# head writes a fresh token to STATE_DIR/auth_token, a worker node reads the head's from
# RAY_AUTH_TOKEN_PATH (as printed by start). Each node's processes run in one new session whose
# id is kept in STATE_DIR/session, with a temp dir of their own; stop and kill end that node only.
set -euo pipefail
usage="usage: ray_local.sh start|stop|kill STATE_DIR | join STATE_DIR HEAD_ADDRESS"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
action=${1:?$usage}
state=$(mkdir -p "${2:?$usage}" && cd "$2" && pwd)
PY=${DISTSPARSE_PYTHON:-${DISTSPARSE_VENV:-$ROOT/.venv}/bin/python}
RAY="$(dirname "$PY")/ray"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# Job entrypoints run `python`: make it the interpreter that has distsparse's dependencies.
export PATH="$(dirname "$PY"):$PATH"

# Start one node in a new session with its own temp dir (Ray's socket paths must stay short, an
# AF_UNIX limit: keep it near the root); refuse if Ray did not keep the node address.
start_node() {
  local node_ip=$1; shift
  local temp; temp=$(mktemp -d /tmp/ray-local.XXXXXX)
  echo "$temp" >"$state/temp_dir"
  setsid -w "$RAY" start "$@" --node-ip-address "$node_ip" --temp-dir "$temp" \
    --dashboard-agent-listen-port "${RAY_AGENT_PORT:-52365}" \
    ${RAY_NUM_CPUS:+--num-cpus "$RAY_NUM_CPUS"} --disable-usage-stats >"$state/start.log" 2>&1 &
  local leader=$!
  echo "$leader" >"$state/session"
  wait "$leader" || { cat "$state/start.log" >&2; exit 1; }
  grep -q "Local node IP.*$node_ip" "$state/start.log" || {
    echo "ray_local.sh: Ray did not keep the node address $node_ip:" >&2
    grep "node IP" "$state/start.log" >&2; exit 1; }
}

# Signal every process of the node's session; with TERM, wait up to 3 s and KILL what is left
# (Ray 2.60's GCS server outlives a SIGTERM by more than 10 s).
end_node() {
  if [[ -f $state/session ]]; then
    local session; session=$(cat "$state/session")
    members() { ps -eo pid=,sid= | awk -v s="$session" '$2 == s {print $1}'; }
    local pids; pids=$(members); [[ -n $pids ]] && kill "-$1" $pids 2>/dev/null || true
    for _ in $(seq 6); do [[ -z $(members) ]] && break; sleep 0.5; done
    pids=$(members); [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
    rm -f "$state/session"
  fi
  if [[ -f $state/temp_dir ]]; then rm -rf "$(cat "$state/temp_dir")" "$state/temp_dir"; fi
}

case $action in
  start)
    export RAY_AUTH_TOKEN_PATH="$state/auth_token"
    (umask 077 && "$PY" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
    node_ip=${RAY_NODE_IP:-127.0.0.2}
    port=${RAY_PORT:-6379}
    dashboard=${RAY_DASHBOARD_PORT:-8265}
    start_node "$node_ip" --head --port "$port" --dashboard-host 127.0.0.1 \
      --dashboard-port "$dashboard" --include-dashboard true \
      --ray-client-server-port "${RAY_CLIENT_PORT:-10001}"
    echo "RAY_ADDRESS=$node_ip:$port"
    echo "RAY_DASHBOARD=http://127.0.0.1:$dashboard"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    ;;
  join)
    address=${3:?$usage}
    [[ -f ${RAY_AUTH_TOKEN_PATH:-} ]] || {
      echo "ray_local.sh: join needs RAY_AUTH_TOKEN_PATH, the head's token (start prints it)" >&2
      exit 2; }
    start_node "${RAY_NODE_IP:-127.0.0.3}" --address "$address"
    echo "RAY_NODE_IP=${RAY_NODE_IP:-127.0.0.3}"
    ;;
  stop) end_node TERM ;;
  kill) end_node KILL ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
