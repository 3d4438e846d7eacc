#!/bin/bash
# A daemon and a `dinod worker` on two "machines": two Linux network namespaces joined by
# a veth link whose rate is bounded (tc's token bucket filter), so the group's traffic crosses a real
# network stack and a bounded link instead of loopback. Needs root (ip netns, tc).
#
#   scripts/netns-cluster.sh measure [CONFIG]   STEPS steps of a 2-node group; step time and
#                                                the bytes the link carried
#   scripts/netns-cluster.sh vanish  [CONFIG]   the worker's machine vanishes mid-run (its
#                                                link goes down: no FIN, no RST); how long
#                                                the daemon takes to notice, and the run
#                                                going on when the link comes back
#
# Environment: DINOD (the binary, default target/release/dinod), RATE (the link's rate each
# way, default 1gbit), STEPS (default 40), REDUCE (runtime.cluster.reduce, default mesh),
# WORK (a scratch folder,
# default a new temporary one), VANISH_AT (the step after which the link goes down,
# default 6), DOWN_S (how long it stays down, default 90).
# CONFIG defaults to configs/default.toml; its [runtime] sections are replaced by a
# [runtime.cluster] for 10.77.0.1:7703 (2 nodes, a token written here).
set -euo pipefail

mode=${1:-measure}
root=$(cd "$(dirname "$0")/.." && pwd)
config=$(realpath "${2:-$root/configs/default.toml}")
DINOD=${DINOD:-$root/target/release/dinod}
RATE=${RATE:-1gbit}
STEPS=${STEPS:-40}
REDUCE=${REDUCE:-mesh}
VANISH_AT=${VANISH_AT:-6}
DOWN_S=${DOWN_S:-90}
WORK=${WORK:-$(mktemp -d /tmp/dinod-netns.XXXXXX)}
export RUST_BACKTRACE=0 DINOD_CACHE_DIR=off RUST_LOG=${RUST_LOG:-warn}

[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, tc)" >&2; exit 2; }
[ -x "$DINOD" ] || { echo "no dinod binary at $DINOD (cargo build --release, or DINOD=...)" >&2; exit 2; }

A=dinod-na
B=dinod-nb
cleanup() {
    pkill -f "dinod-netns-worker" 2>/dev/null || true
    ip netns pids $A 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns pids $B 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del $A 2>/dev/null || true
    ip netns del $B 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $A
ip netns add $B
ip link add dinod-va type veth peer name dinod-vb
ip link set dinod-va netns $A
ip link set dinod-vb netns $B
ip -n $A addr add 10.77.0.1/24 dev dinod-va
ip -n $B addr add 10.77.0.2/24 dev dinod-vb
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set dinod-va up
ip -n $B link set dinod-vb up
tc -n $A qdisc add dev dinod-va root tbf rate "$RATE" burst 256kb latency 100ms
tc -n $B qdisc add dev dinod-vb root tbf rate "$RATE" burst 256kb latency 100ms

cd "$WORK"
printf 'a-token-for-the-netns-drill\n' > token
chmod 600 token
python3 "$root/scripts/strip_runtime.py" "$config" > recipe.toml
cat >> recipe.toml <<EOF

[runtime.cluster]
listen = "10.77.0.1:7703"
nodes = 2
token_file = "$WORK/token"
reduce = "$REDUCE"
EOF

link_bytes() { ip -n $A -s -j link show dinod-va | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["rx"]["bytes"] + s["tx"]["bytes"])'; }
status_json() { "$DINOD" status --state-dir "$WORK/state" --json 2>/dev/null || echo '{}'; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); r=d.get('run') or {}; print($1)"; }
# the worker, in B, restarted 5 s after a failed exit as scripts/dinod-worker.service
# does (exit 0: the daemon's run ended); its argv carries a marker so that cleanup finds it
start_worker() {
    ip netns exec $B bash -c "until (exec -a dinod-netns-worker $DINOD worker --config $WORK/recipe.toml --join 10.77.0.1:7703); do echo 'worker exited; restarting it in 5 s' >&2; sleep 5; done" \
        >> worker.out 2>> worker.err &
}

echo "link: $RATE each way; work in $WORK; $("$DINOD" --version 2>/dev/null || echo dinod)"
case "$mode" in
measure)
    rm -rf state
    before=$(link_bytes)
    start_worker
    t0=$(date +%s.%N)
    ip netns exec $A "$DINOD" run --config recipe.toml --state-dir state --max-steps "$STEPS" > daemon.out 2> daemon.err \
        || { echo "the daemon failed:" >&2; tail -5 daemon.err >&2; exit 1; }
    t1=$(date +%s.%N)
    after=$(link_bytes)
    sleep 1
    status_json | field '"steps %s, step_ms %.1f, images/s %.1f" % (r.get("step"), r.get("step_ms") or 0, r.get("images_per_s") or 0)'
    python3 -c "print('link bytes %d (%.1f MB per step), wall %.1f s' % ($after - $before, ($after - $before) / 1e6 / $STEPS, $t1 - $t0))"
    ;;
vanish)
    rm -rf state
    start_worker
    total=$((VANISH_AT + 20))
    ip netns exec $A "$DINOD" run --config recipe.toml --state-dir state --max-steps "$total" > daemon.out 2> daemon.err &
    daemon=$!
    while :; do
        s=$(status_json | field 'r.get("step") or 0')
        [ "$s" -ge "$VANISH_AT" ] && break
        sleep 0.2
    done
    ip -n $B link set dinod-vb down
    down=$(date +%s.%N)
    echo "link down after step $s"
    noticed=""
    while [ -z "$noticed" ]; do
        st=$(status_json | field '(r.get("cluster") or {}).get("state", "")')
        if [ "$st" = failed ] || [ "$st" = waiting ]; then
            noticed=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $down))")
        fi
        t=$(python3 -c "print(int($(date +%s.%N) - $down))")
        [ "$t" -gt $((DOWN_S + 600)) ] && { echo "the daemon did not notice in $t s" >&2; exit 1; }
        sleep 0.5
    done
    echo "the daemon noticed after $noticed s: $(status_json | field '(r.get("cluster") or {}).get("line", "")')"
    left=$(python3 -c "print(max(0, $DOWN_S - ($(date +%s.%N) - $down)))")
    sleep "$left"
    ip -n $B link set dinod-vb up
    echo "link up after ${DOWN_S} s"
    wait $daemon && rc=0 || rc=$?
    echo "daemon exit $rc at step $(status_json | field 'r.get("step")')"
    echo "admissions: $(grep -c "joined as rank 1" daemon.err)"
    "$DINOD" events --state-dir state --limit 1000 | grep -E "actor.restarting|step.redo|run.fatal" | cut -c1-300 | head -5 || true
    echo "worker:"
    grep -E "failed|exited|joined|error" worker.err | cut -c1-300 | head -8 || true
    [ "$rc" = 0 ] || { echo "the daemon did not end its run after the link came back" >&2; exit 1; }
    ;;
*)
    echo "usage: $0 measure|vanish [CONFIG]" >&2
    exit 2
    ;;
esac
