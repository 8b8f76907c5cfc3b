# shellcheck shell=bash
# Private Redis servers and clusters for the benchmark scripts (sourced by
# scripts/bench-load and scripts/bench-redis). Needs TMP (a scratch directory) and
# PIDS (an array the caller's cleanup kills) to be set by the caller.

# A port that is free, and whose cluster bus port (+10000) is free too.
free_port() {
  python3 -c '
import random, socket
while True:
    p = random.randint(20000, 29999)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
    except OSError:
        continue
    print(p); break'
}

# start_redis PORT [ARGS…]: a redis-server without persistence; its pid in LAST. (Not
# printed for a $(…): in that subshell the process would be no child of this shell, so
# neither `wait` nor the cleanup would reach it.)
start_redis() {
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --dir "$TMP" "$@" >/dev/null 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done
  LAST=$pid
}

# start_cluster: 3 masters + 3 replicas on free ports; their ports in CLUSTER_PORTS, pids
# in CLUSTER_PIDS, the service's REDIS_CLUSTER_NODES value in CLUSTER_SEEDS.
start_cluster() {
  CLUSTER_PORTS=() CLUSTER_PIDS=()
  local p nodes=()
  for _ in 1 2 3 4 5 6; do
    p=$(free_port); CLUSTER_PORTS+=("$p"); nodes+=("127.0.0.1:$p")
    start_redis "$p" --cluster-enabled yes --cluster-config-file "$TMP/nodes-$p.conf" --cluster-node-timeout 5000
    CLUSTER_PIDS+=("$LAST")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
  for _ in $(seq 1 100); do
    redis-cli -p "${CLUSTER_PORTS[0]}" CLUSTER INFO | grep -q 'cluster_state:ok' && break; sleep 0.1
  done
  CLUSTER_SEEDS=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER_PORTS[@]}"); CLUSTER_SEEDS=${CLUSTER_SEEDS%,}
}

# ticks PID…: CPU time (user + system) of the processes so far, in clock ticks.
ticks() { local t=0 pid; for pid in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo "$t"; }
