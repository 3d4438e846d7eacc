#!/bin/bash
# A node gone and back (`runtime.cluster.min_nodes`): the daemon and 3 `dinod worker`s on
# loopback (4 nodes, min_nodes 3, the default recipe at batch 48, which splits into 3
# and 4), worker 1 SIGKILLed at step KILL_AT and started again only at step BACK_AT. The
# group must form with 3 after join_wait_s, train on, form again with 4 when the worker
# is back, and end the run (exit 0) with the copies checked every 10 steps. Prints the
# times and the cluster events; exit 1 when the run did not end or the group never
# became whole again.
#
#   scripts/cluster-elastic-drill.sh
#
# Environment: DINOD (default target/release/dinod), N (steps, default 200), KILL_AT
# (default 60), BACK_AT (default 140), JOIN_WAIT (join_wait_s, default 20), PORT
# (default 7791), WORK (a scratch folder, default a new one).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
DINOD=${DINOD:-$root/target/release/dinod}
N=${N:-200}
KILL_AT=${KILL_AT:-60}
BACK_AT=${BACK_AT:-140}
JOIN_WAIT=${JOIN_WAIT:-20}
PORT=${PORT:-7791}
WORK=${WORK:-$(mktemp -d /tmp/dinod-elastic.XXXXXX)}
export RUST_BACKTRACE=0 DINOD_CACHE_DIR=off RUST_LOG=${RUST_LOG:-warn}
[ -x "$DINOD" ] || { echo "no dinod binary at $DINOD (cargo build --release, or DINOD=...)" >&2; exit 2; }

cd "$WORK"
printf 'a-token-for-the-elastic-drill\n' > token
chmod 600 token
python3 "$root/scripts/strip_runtime.py" "$root/configs/default.toml" |
    sed 's/^batch_size = 32$/batch_size = 48/' > base.toml
{ cat base.toml; printf '\n[runtime.cluster]\nlisten = "127.0.0.1:%s"\nnodes = 4\nmin_nodes = 3\njoin_wait_s = %s\ntoken_file = "%s/token"\nverify_every_steps = 10\n' "$PORT" "$JOIN_WAIT" "$WORK"; } > cluster.toml

step_of() {
    "$DINOD" status --state-dir state --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["step"])' 2>/dev/null || echo 0
}
T0=$(date +%s.%N)
t() { python3 -c "import time; print(round(time.time() - $T0, 1))"; }
worker() { "$DINOD" worker --config cluster.toml --join "127.0.0.1:$PORT" > "$1" 2>&1 & }

echo "work in $WORK: $N steps, 4 nodes, min_nodes 3, join_wait_s $JOIN_WAIT"
worker worker1.err
w1=$!
worker worker2.err
worker worker3.err
"$DINOD" run --config cluster.toml --state-dir state --max-steps "$N" > daemon.out 2> daemon.err &
daemon=$!
while [ "$(step_of)" -lt "$KILL_AT" ]; do sleep 0.5; done
kill -9 "$w1"
echo "worker 1 SIGKILLed at step $(step_of), t = $(t) s"
while [ "$(step_of)" -lt "$BACK_AT" ] && kill -0 "$daemon" 2>/dev/null; do sleep 0.5; done
worker worker1-back.err
echo "worker 1 started again at step $(step_of), t = $(t) s"
wait "$daemon"
rc=$?
echo "daemon exit $rc at t = $(t) s"
wait
"$DINOD" status --state-dir state | grep -E "^(step|device|cluster|copies|throughput)"
"$DINOD" events --state-dir state --limit 1000 | grep -E "cluster\.|step\.redo|run\.fatal" | cut -c1-200
whole=$("$DINOD" events --state-dir state --limit 1000 | grep -c "cluster.complete")
if [ "$rc" = 0 ] && [ "$whole" -ge 1 ]; then
    echo "the run went on with 3 nodes and took the fourth back"
else
    echo "FAILED (see $WORK)" >&2
    exit 1
fi
