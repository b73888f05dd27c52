#!/usr/bin/env bash
# A local Switchboard cluster on loopback: three nodes to start with, then add and remove
# nodes the way an operator does (edit cluster.toml, start the new node, SIGHUP them all).
#
#   scripts/local-cluster.sh start  [DIR]      # n1..n3; default DIR: ./local-cluster
#   scripts/local-cluster.sh add    [DIR]      # the next node (n4, n5, ...), then reload
#   scripts/local-cluster.sh remove ID [DIR]   # out of the file, SIGHUP everyone
#   scripts/local-cluster.sh status [DIR]      # GET /admin/cluster from a running node
#   scripts/local-cluster.sh stop   [DIR]
#
# Node nK: client 127.0.0.1:808K, peer links :908K. Admin token: local-admin.
# Data and logs under DIR (nK/, nK.log); each node's pid in DIR/nK.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-start}
if [ "$cmd" = remove ]; then
    id=${2:?usage: $0 remove ID [DIR]}
    dir=${3:-local-cluster}
else
    dir=${2:-local-cluster}
fi
mkdir -p "$dir"
admin=(-H 'Authorization: Bearer local-admin')

node_entry() {
    printf '[[node]]\nid = "n%s"\nclient_addr = "127.0.0.1:808%s"\npeer_addr = "127.0.0.1:908%s"\ndata_dir = "n%s"\n\n' "$1" "$1" "$1" "$1"
}

launch() {
    target/release/switchboard serve --config "$dir/cluster.toml" --node "n$1" \
        >> "$dir/n$1.log" 2>&1 &
    echo $! > "$dir/n$1.pid"
}

wait_healthy() {
    for _ in $(seq 300); do
        curl -sf "127.0.0.1:808$1/healthz" > /dev/null && return 0
        sleep 0.1
    done
    echo "n$1 does not serve; see $dir/n$1.log" >&2
    exit 1
}

running() {
    for f in "$dir"/n*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then basename "$f" .pid; else rm -f "$f"; fi
    done
}

case "$cmd" in
start)
    cargo build --release --quiet
    if [ ! -f "$dir/cluster.toml" ]; then
        {
            printf '[cluster]\nvnodes = 64\nadmin_token = "local-admin"\n\n'
            for i in 1 2 3; do node_entry "$i"; done
        } > "$dir/cluster.toml"
    fi
    for id in $(grep -o '^id = "n[0-9]*"' "$dir/cluster.toml" | grep -o '[0-9]*'); do
        launch "$id"
    done
    for id in $(grep -o '^id = "n[0-9]*"' "$dir/cluster.toml" | grep -o '[0-9]*'); do
        wait_healthy "$id"
    done
    echo "up: $(running | tr '\n' ' ')"
    echo "cluster view:  $0 status $dir"
    echo "stop:          $0 stop $dir"
    ;;
add)
    last=$(grep -o '^id = "n[0-9]*"' "$dir/cluster.toml" | grep -o '[0-9]*' | sort -n | tail -1)
    next=$((last + 1))
    node_entry "$next" >> "$dir/cluster.toml"
    launch "$next"
    for n in $(running); do
        [ "$n" = "n$next" ] || kill -HUP "$(cat "$dir/$n.pid")"
    done
    wait_healthy "$next"
    echo "n$next joined (client 127.0.0.1:808$next); the handoff runs now: $0 status $dir"
    ;;
remove)
    python3 - "$dir/cluster.toml" "$id" <<'EOF'
import sys
path, node = sys.argv[1], sys.argv[2]
blocks = open(path).read().split("[[node]]")
kept = [blocks[0]] + ["[[node]]" + b for b in blocks[1:] if f'id = "{node}"' not in b]
open(path, "w").write("".join(kept))
EOF
    for n in $(running); do kill -HUP "$(cat "$dir/$n.pid")"; done
    echo "$id is handing off; it stops by itself once the others have it: $0 status $dir"
    ;;
status)
    for n in $(running); do
        curl -sf "${admin[@]}" "127.0.0.1:808${n#n}/admin/cluster" && echo && exit 0
    done
    echo "no node answers" >&2
    exit 1
    ;;
stop)
    for n in $(running); do kill "$(cat "$dir/$n.pid")" 2>/dev/null || true; rm -f "$dir/$n.pid"; done
    ;;
*)
    echo "usage: $0 start|add|remove ID|status|stop [DIR]" >&2
    exit 2
    ;;
esac
