#!/bin/bash
# A long run of a group of processes against the same group of threads: the daemon and
# NODES - 1 `dinod worker`s on loopback (the workers' copies checked every 10 steps),
# worker 1 SIGKILLed half-way and started again, then both runs' fingerprints compared.
# Exit 0 when they are equal, 1 when they differ.
#
#   scripts/cluster-soak.sh [CONFIG]
#
# Environment: DINOD (default target/release/dinod), N (steps, default 300), KILL (1:
# kill the worker at step N/2, default 1), WORK (a scratch folder, default a new one),
# PORT (default 7704), WORKER_DATA (`sent` or `local`: runtime.cluster.worker_data,
# default sent), NODES (default 2), REDUCE (`mesh` or `star`: runtime.cluster.reduce,
# default mesh). CONFIG defaults to configs/default.toml; its [runtime] sections are
# replaced by `data_parallel = NODES` for the threads and a NODES-node [runtime.cluster].
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
config=$(realpath "${1:-$root/configs/default.toml}")
DINOD=${DINOD:-$root/target/release/dinod}
N=${N:-300}
KILL=${KILL:-1}
PORT=${PORT:-7704}
WORKER_DATA=${WORKER_DATA:-sent}
NODES=${NODES:-2}
REDUCE=${REDUCE:-mesh}
WORK=${WORK:-$(mktemp -d /tmp/dinod-soak.XXXXXX)}
export RUST_BACKTRACE=0 DINOD_CACHE_DIR=off RUST_LOG=${RUST_LOG:-warn}
[ -x "$DINOD" ] || { echo "no dinod binary at $DINOD (cargo build --release, or DINOD=...)" >&2; exit 2; }

cd "$WORK"
printf 'a-token-for-the-soak-run\n' > token
chmod 600 token
python3 "$root/scripts/strip_runtime.py" "$config" > base.toml
{ cat base.toml; printf '\n[runtime]\ndata_parallel = %s\n' "$NODES"; } > threads.toml
{ cat base.toml; printf '\n[runtime.cluster]\nlisten = "127.0.0.1:%s"\nnodes = %s\ntoken_file = "%s/token"\nverify_every_steps = 10\nworker_data = "%s"\nreduce = "%s"\n' "$PORT" "$NODES" "$WORK" "$WORKER_DATA" "$REDUCE"; } > cluster.toml

fingerprint() {
    "$DINOD" status --state-dir "$1" --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["run"]; print(r["step"], r.get("fingerprint"))'
}
step_of() {
    "$DINOD" status --state-dir "$1" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["step"])' 2>/dev/null || echo 0
}

echo "work in $WORK: $N steps of $config, $NODES nodes ($REDUCE)"
"$DINOD" run --config threads.toml --state-dir threads --max-steps "$N" > threads.out 2> threads.err
want=$(fingerprint threads)
echo "threads:   $want"

"$DINOD" worker --config cluster.toml --join "127.0.0.1:$PORT" > worker1.out 2> worker1.err &
worker=$!
for i in $(seq 2 $((NODES - 1))); do
    "$DINOD" worker --config cluster.toml --join "127.0.0.1:$PORT" > worker-$i.out 2> worker-$i.err &
done
"$DINOD" run --config cluster.toml --state-dir cluster --max-steps "$N" > daemon.out 2> daemon.err &
daemon=$!
if [ "$KILL" = 1 ]; then
    while [ "$(step_of cluster)" -lt $((N / 2)) ]; do sleep 1; done
    kill -9 "$worker"
    echo "worker SIGKILLed at step $(step_of cluster)"
    "$DINOD" worker --config cluster.toml --join "127.0.0.1:$PORT" > worker2.out 2> worker2.err &
fi
wait "$daemon"
wait || true
got=$(fingerprint cluster)
echo "processes: $got"
"$DINOD" status --state-dir cluster | grep -E "^(cluster|copies)" || true
if [ "$got" = "$want" ]; then
    echo "the same bits"
else
    echo "DIFFERENT" >&2
    exit 1
fi
