#!/usr/bin/env bash
# Starts (or stops) a local three-node Switchboard cluster on loopback.
#
#   scripts/local-cluster.sh start [DIR]   # default DIR: ./local-cluster
#   scripts/local-cluster.sh stop  [DIR]
#
# Clients: 127.0.0.1:8081, :8082, :8083. Peer links: :9081-9083. Admin token: local-admin.
# Data and logs under DIR (n1/, n2/, n3/, n*.log); the nodes' pids in DIR/pids.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-start}
dir=${2:-local-cluster}
mkdir -p "$dir"

case "$cmd" in
start)
    cargo build --release --quiet
    if [ ! -f "$dir/cluster.toml" ]; then
        {
            printf '[cluster]\nvnodes = 64\nadmin_token = "local-admin"\n\n'
            for i in 1 2 3; do
                printf '[[node]]\nid = "n%s"\nclient_addr = "127.0.0.1:808%s"\npeer_addr = "127.0.0.1:908%s"\ndata_dir = "n%s"\n\n' "$i" "$i" "$i" "$i"
            done
        } > "$dir/cluster.toml"
    fi
    : > "$dir/pids"
    for i in 1 2 3; do
        target/release/switchboard serve --config "$dir/cluster.toml" --node "n$i" \
            > "$dir/n$i.log" 2>&1 &
        echo $! >> "$dir/pids"
    done
    for i in 1 2 3; do
        for _ in $(seq 100); do
            curl -sf "127.0.0.1:808$i/healthz" > /dev/null && break
            sleep 0.1
        done
        curl -sf "127.0.0.1:808$i/healthz" > /dev/null || { echo "n$i did not start; see $dir/n$i.log" >&2; exit 1; }
    done
    echo "three nodes up: 127.0.0.1:8081 8082 8083 (pids $(tr '\n' ' ' < "$dir/pids"))"
    echo "cluster view:  curl -s 127.0.0.1:8081/admin/cluster -H 'Authorization: Bearer local-admin'"
    echo "stop:          $0 stop $dir"
    ;;
stop)
    [ -f "$dir/pids" ] && xargs -r kill < "$dir/pids" 2>/dev/null || true
    rm -f "$dir/pids"
    ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
