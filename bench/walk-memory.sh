#!/usr/bin/env bash
# Measures a node's memory while it walks a storage of N repositories (default 100000):
# prints the node's peak RSS before and after the walk, and the walk's duration.
#
#   bash bench/walk-memory.sh [N]
set -euo pipefail
count=${1:-100000}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gitfleet-target}"
cargo build -q --release --bin gitfleet --example walk
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'kill $node_pid 2>/dev/null || true; rm -rf "$work"' EXIT

echo "creating $count minimal repositories..."
python3 - "$work/storage" "$count" <<'PY'
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    repo = os.path.join(root, "@replicas", "%02x" % (i % 256), "%02x" % (i // 256 % 256), "%d.git" % i)
    os.makedirs(os.path.join(repo, "objects"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "HEAD"), "w") as head:
        head.write("ref: refs/heads/main\n")
PY

export GITFLEET_TOKEN=bench-secret-0123456789
cat > "$work/node.toml" <<TOML
listen = "127.0.0.1:0"
[auth]
token = "$GITFLEET_TOKEN"
[[storages]]
name = "bench"
path = "$work/storage"
TOML
coproc NODE { GITFLEET_LOG=warn exec "$bin/gitfleet" node --config "$work/node.toml"; }
node_pid=$NODE_PID
read -r line <&"${NODE[0]}"
address="http://${line##* }"
peak() { awk '/VmHWM/ {print $2 " kB"}' "/proc/$node_pid/status"; }
echo "node peak RSS before the walk: $(peak)"
"$bin/examples/walk" "$address" bench
echo "node peak RSS after the walk:  $(peak)"
