#!/bin/bash
# Groups of dinod processes on N "machines": Linux network namespaces on a switch (a
# bridge in its own namespace), each machine's link bounded to RATE in both directions
# (tc's token bucket filter on both ends of its veth), so every sum crosses a real network
# stack and links of a real rate instead of loopback. Needs root (ip netns, tc).
#
#   scripts/netns-group.sh allreduce [NODES...]   `dinod bench allreduce`: VALUES f32
#                                                  summed ITERS times; rank 0's median time
#                                                  per sum and its traffic per sum
#   scripts/netns-group.sh train [NODES...]       the daemon and NODES - 1 `dinod worker`s
#                                                  train STEPS steps of CONFIG; step time
#   (NODES default: 2 3 4; each size is run once for each of REDUCES)
#
# Environment: DINOD (the binary, default target/release/dinod), RATE (default 1gbit),
# VALUES (default 4800000: 19.2 MB, about twice the default recipe's student of
# 2 496 032 parameters), ITERS (default 10), STEPS
# (default 30), CONFIG (default configs/default.toml; its [runtime] sections are replaced
# by a [runtime.cluster]), REDUCES (default "star mesh"), WORK (a scratch folder, default
# a new temporary one).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
DINOD=${DINOD:-$root/target/release/dinod}
RATE=${RATE:-1gbit}
VALUES=${VALUES:-4800000}
ITERS=${ITERS:-10}
REDUCES=${REDUCES:-star mesh}
WORK=${WORK:-$(mktemp -d /tmp/dinod-netns-group.XXXXXX)}
export RUST_BACKTRACE=0 DINOD_CACHE_DIR=off RUST_LOG=${RUST_LOG:-warn}
STEPS=${STEPS:-30}
CONFIG=$(realpath "${CONFIG:-$root/configs/default.toml}")
mode=${1:-allreduce}
shift || true
case "$mode" in allreduce|train) ;; *) echo "usage: $0 allreduce|train [NODES...]" >&2; exit 2;; esac
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(2 3 4)

[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, tc)" >&2; exit 2; }
[ -x "$DINOD" ] || { echo "no dinod binary at $DINOD (cargo build --release, or DINOD=...)" >&2; exit 2; }
max=0
for n in "${sizes[@]}"; do [ "$n" -gt "$max" ] && max=$n; done

SW=dinod-sw
cleanup() {
    for i in $(seq 0 $((max - 1))); do
        ip netns pids dinod-m$i 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del dinod-m$i 2>/dev/null || true
    done
    ip netns del $SW 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $SW
ip -n $SW link add dinod-br type bridge
ip -n $SW link set dinod-br up
for i in $(seq 0 $((max - 1))); do
    m=dinod-m$i
    ip netns add $m
    ip link add dinod-e$i type veth peer name dinod-p$i
    ip link set dinod-e$i netns $m
    ip link set dinod-p$i netns $SW
    ip -n $m addr add 10.78.0.$((i + 1))/24 dev dinod-e$i
    ip -n $m link set lo up
    ip -n $m link set dinod-e$i up
    ip -n $SW link set dinod-p$i master dinod-br
    ip -n $SW link set dinod-p$i up
    # both directions of the machine's link
    tc -n $m qdisc add dev dinod-e$i root tbf rate "$RATE" burst 256kb latency 100ms
    tc -n $SW qdisc add dev dinod-p$i root tbf rate "$RATE" burst 256kb latency 100ms
done

cd "$WORK"
printf 'a-token-for-the-netns-group\n' > token
chmod 600 token
link_bytes() { ip -n dinod-m0 -s -j link show dinod-e0 | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["rx"]["bytes"] + s["tx"]["bytes"])'; }

status_json() { "$DINOD" status --state-dir "$1" --json 2>/dev/null || echo '{}'; }

train() {
    echo "rate $RATE, $(basename "$CONFIG"), $STEPS steps"
    printf '%-5s %-5s %10s %10s %14s %s\n' nodes reduce step_ms images/s grad_wait_ms link0_MB/step
    port=7950
    for n in "${sizes[@]}"; do
        for red in $REDUCES; do
            port=$((port + 1))
            d=$WORK/t-$n-$red
            mkdir -p "$d"
            python3 "$root/scripts/strip_runtime.py" "$CONFIG" > "$d/recipe.toml"
            printf '\n[runtime.cluster]\nlisten = "10.78.0.1:%s"\nnodes = %s\ntoken_file = "%s"\nreduce = "%s"\n' \
                "$port" "$n" "$WORK/token" "$red" >> "$d/recipe.toml"
            before=$(link_bytes)
            pids=()
            for i in $(seq 1 $((n - 1))); do
                ip netns exec dinod-m$i "$DINOD" worker --config "$d/recipe.toml" --join 10.78.0.1:$port \
                    > "$d/w$i.out" 2> "$d/w$i.err" &
                pids+=($!)
            done
            ip netns exec dinod-m0 "$DINOD" run --config "$d/recipe.toml" --state-dir "$d/state" \
                --max-steps "$STEPS" > "$d/daemon.out" 2> "$d/daemon.err" \
                || { echo "the daemon failed ($n, $red):" >&2; tail -5 "$d/daemon.err" >&2; exit 1; }
            after=$(link_bytes)
            for p in "${pids[@]}"; do wait "$p" || { echo "a worker failed ($n, $red)" >&2; exit 1; }; done
            status_json "$d/state" | python3 -c "
import json, sys
r = json.load(sys.stdin).get('run') or {}
w = ((r.get('cluster') or {}).get('copies') or {}).get('grad_wait_ms') or 0
print('%-5s %-5s %10.1f %10.1f %14.1f %.1f' % ($n, '$red', r.get('step_ms') or 0, r.get('images_per_s') or 0, w, ($after - $before) / 1e6 / $STEPS))"
        done
    done
}

allreduce() {
    echo "rate $RATE, $VALUES f32 per sum ($((VALUES * 4 / 1000000)) MB), $ITERS timed sums; rank 0's view"
    printf '%-5s %-5s %10s %10s %10s %12s %14s %s\n' nodes reduce median_ms min_ms algbw_GB/s sent_MB/sum received_MB/sum link0_MB/sum
    port=7900
    for n in "${sizes[@]}"; do
        for red in $REDUCES; do
            port=$((port + 1))
            before=$(link_bytes)
            ip netns exec dinod-m0 "$DINOD" bench allreduce --listen 10.78.0.1:$port --nodes "$n" \
                --token-file token --reduce "$red" --values "$VALUES" --iters "$ITERS" \
                > r-$n-$red.json 2> r-$n-$red.err &
            pids=($!)
            sleep 0.3
            for i in $(seq 1 $((n - 1))); do
                ip netns exec dinod-m$i "$DINOD" bench allreduce --join 10.78.0.1:$port \
                    --token-file token > w$i-$n-$red.json 2> w$i-$n-$red.err &
                pids+=($!)
            done
            ok=0
            for p in "${pids[@]}"; do wait "$p" || ok=1; done
            after=$(link_bytes)
            if [ $ok != 0 ]; then
                echo "the group of $n ($red) failed:" >&2
                cat r-$n-$red.err w*-$n-$red.err >&2
                exit 1
            fi
            python3 - "$n" "$red" "$before" "$after" "$ITERS" r-$n-$red.json <<'EOF'
import json, sys
n, red, before, after, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
d = json.load(open(sys.argv[6]))
assert d["all_members_correct"], "a member's sums were wrong"
# (the link's bytes include the admission and the untimed sums: per sum over all of them)
print(f'{n:<5} {red:<5} {d["median_ms"]:10.1f} {d["min_ms"]:10.1f} {d["algbw_gb_s"]:10.3f} '
      f'{d["sent_bytes_per_sum"] / 1e6:12.1f} {d["received_bytes_per_sum"] / 1e6:14.1f} '
      f'{(after - before) / 1e6 / (iters + 2):.1f}')
EOF
        done
    done
}

$mode
