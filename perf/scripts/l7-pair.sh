#!/bin/bash
# Runs one L7 sidecar pair (or the nginx L7 pair) by itself, from the work directory of a
# `sigil-perf-harness --keep` run, under wrk or h2load, and prints CPU per request of each
# side (from /proc), context switches per request, the machine's busy and idle time per
# request (from /proc/stat) and how each side's CPU was shared among its threads. For A/B
# comparisons of two sigil-proxy builds: interleave them.
#
#   perf/scripts/l7-pair.sh sigil BIN_DIR [wrk|h2|rate] [stat|perf]
#   perf/scripts/l7-pair.sh nginx [wrk|h2|rate]
#
# `rate` is HTTP/1.1 at 1,000 evenly spaced req/s (h2load, 10 connections opened 1 ms apart,
# 100 req/s each) and also prints p50/p99 from h2load's log. WORK_DIR picks the work
# directory (default: the newest /tmp/sigil-perf-*-0). Its certificates are valid for an
# hour after the harness made them. `stat` counts the sides' syscalls with `perf stat`
# (STAT_EVENTS replaces the event list: uprobes, say); `perf` records profiles
# (OUT_PREFIX.{c,s}.data; PERF_FREQ and PERF_CG change -F 2000 and -g, e.g.
# PERF_CG="--call-graph dwarf"). Each load runs 8 s against 127.0.0.1 only; every process
# started here is ended by its PID.
set -eu
WHAT=$1; shift; latency=
W=${WORK_DIR:-$(ls -dt /tmp/sigil-perf-*-0 | head -1)}
OUT=${OUT_PREFIX:-/tmp/l7-pair}
[ "$WHAT" = sigil ] && BIN=$(realpath "$1")
cd "$W"
if [ "$WHAT" = sigil ]; then
  MODE=${2:-wrk}; EXTRA=${3:-}
  LISTEN=$(grep -oP 'listen: "\K[0-9.:]+' sigil-l7-client.yaml | tail -1)
  CA=$(grep -oP 'admin: \{listen: "\K[0-9.:]+' sigil-l7-client.yaml)
  SA=$(grep -oP 'admin: \{listen: "\K[0-9.:]+' sigil-l7-server.yaml)
  H1=$LISTEN; H2=$LISTEN
else
  MODE=${1:-wrk}; EXTRA=
  H1=$(grep -oP 'listen \K127[0-9.:]+(?=;)' nginx-l7-client.conf | head -1)
  H2=$(grep -oP 'listen \K127[0-9.:]+(?= http2)' nginx-l7-client.conf | head -1)
fi
nginx -c "$W/backend.conf" >/dev/null 2>&1 & B=$!
if [ "$WHAT" = sigil ]; then
  SIGIL_LOG=warn "$BIN/sigil-proxy" --config "$W/sigil-l7-server.yaml" >"$OUT.s.log" 2>&1 & S=$!
  SIGIL_LOG=warn "$BIN/sigil-proxy" --config "$W/sigil-l7-client.yaml" >"$OUT.c.log" 2>&1 & C=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://$SA/ready" && curl -sf -o /dev/null "http://$CA/ready" && break
    sleep 0.1
  done
else
  nginx -c "$W/nginx-l7-server.conf" >/dev/null 2>&1 & S=$!
  nginx -c "$W/nginx-l7-client.conf" >/dev/null 2>&1 & C=$!
  sleep 0.5
fi
trap 'kill $C $S $B 2>/dev/null; wait 2>/dev/null' EXIT
curl -sf -o /dev/null "http://$H1/api/v1/orders/42" || { echo "the pair does not answer"; exit 1; }
# A process and its children (nginx workers): CPU ticks, context switches.
ticks() { local t=0 p; for p in $1 $(pgrep -P "$1"); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
switches() {
  local t=0 p s
  for p in $1 $(pgrep -P "$1"); do
    for s in /proc/$p/task/*/status; do
      t=$((t + $(awk '/^(non)?voluntary_ctxt_switches/{n+=$2} END{print n}' "$s")))
    done
  done
  echo $t
}
# Each thread of a process (sigil's workers, or nginx's processes): "name:ticks ...". An
# uneven split between sigil's workers means connections were dealt unevenly.
per_thread() {
  local p t
  for p in $1 $(pgrep -P "$1"); do
    for t in /proc/$p/task/*; do echo -n "$(cat "$t/comm")/${t##*/}:$(awk '{print $14+$15}' "$t/stat") "; done
  done
}
read -r _ u0 n0 y0 i0 w0 q0 s0 _ < /proc/stat
ct0=$(per_thread $C); st0=$(per_thread $S)
c0=$(ticks $C); s0t=$(ticks $S); cc0=$(switches $C); sc0=$(switches $S)
if [ "$EXTRA" = stat ]; then
  EV=${STAT_EVENTS:-syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex}
  perf stat -e $EV -p $C -o "$OUT.c.stat" -- sleep 8 & P1=$!
  perf stat -e $EV -p $S -o "$OUT.s.stat" -- sleep 8 & P2=$!
elif [ "$EXTRA" = perf ]; then
  perf record -F ${PERF_FREQ:-2000} ${PERF_CG:--g} -o "$OUT.c.data" -p $C -- sleep 8 >/dev/null 2>&1 & P1=$!
  perf record -F ${PERF_FREQ:-2000} ${PERF_CG:--g} -o "$OUT.s.data" -p $S -- sleep 8 >/dev/null 2>&1 & P2=$!
fi
if [ "$MODE" = wrk ]; then
  timeout 40 wrk -t2 -c64 -d8s --latency "http://$H1/api/v1/orders/42" > "$OUT.load"
  n=$(grep -oP '\d+(?= requests in)' "$OUT.load")
  rate=$(grep -oP 'Requests/sec:\s+\K[0-9.]+' "$OUT.load")
elif [ "$MODE" = rate ]; then
  timeout 40 h2load --h1 -t1 -c10 -m1 -n8000 --rps 100 -r 1 --rate-period 1ms \
    --log-file="$OUT.rate.log" "http://$H1/api/v1/orders/42" > "$OUT.load"
  n=$(grep -oP '\d+(?= succeeded)' "$OUT.load")
  rate=$(grep -oP 'finished in [0-9.]+s, \K[0-9.]+' "$OUT.load")
  latency=$(awk '{print $3}' "$OUT.rate.log" | sort -n |
    awk '{a[NR] = $1} END {printf "p50 %.3f ms, p99 %.3f ms", a[int(NR * 0.5 + 0.5)] / 1000, a[int(NR * 0.99 + 0.5)] / 1000}')
else
  timeout 40 h2load -t1 -c16 -m10 -D8 "http://$H2/api/v1/orders/42" > "$OUT.load"
  n=$(grep -oP '\d+(?= succeeded)' "$OUT.load")
  rate=$(grep -oP 'finished in [0-9.]+s, \K[0-9.]+' "$OUT.load")
fi
read -r _ u1 n1 y1 i1 w1 q1 s1 _ < /proc/stat
ct1=$(per_thread $C); st1=$(per_thread $S)
c1=$(ticks $C); s1t=$(ticks $S); cc1=$(switches $C); sc1=$(switches $S)
[ -n "$EXTRA" ] && wait $P1 $P2
# Ticks are 10 ms: ticks * 10^4 / n is µs per request.
echo "$WHAT $MODE: $n requests, $rate req/s${latency:+, $latency}"
echo "  CPU µs/request: client side $(( (c1 - c0) * 10000 / n )), server side $(( (s1t - s0t) * 10000 / n ))"
echo "  context switches/request: client side $(echo "scale=2; ($cc1 - $cc0) / $n" | bc), server side $(echo "scale=2; ($sc1 - $sc0) / $n" | bc)"
echo "  machine µs/request: busy $(( (u1 + n1 + y1 + q1 + s1 - u0 - n0 - y0 - q0 - s0) * 10000 / n )), idle $(( (i1 + w1 - i0 - w0) * 10000 / n ))"
# Threads that used CPU during the load, with their share of the side's ticks.
busy_threads() {
  echo "$1" "$2" | tr ' ' '\n' | awk -F: 'NF == 2 { if (!($1 in a)) a[$1] = $2; else d[$1] = $2 - a[$1] }
    END { for (k in d) t += d[k]; for (k in d) if (d[k] > 0) { name = k; sub("/.*", "", name); printf " %s %d%%", name, 100 * d[k] / t } }'
}
echo "  busy threads: client side$(busy_threads "$ct0" "$ct1"); server side$(busy_threads "$st0" "$st1")"
if [ "$EXTRA" = stat ]; then
  for side in c s; do
    echo "  syscalls/request, $side side:"
    grep -E 'syscalls|probe' "$OUT.$side.stat" | awk -v n="$n" '{gsub(",", "", $1); sub("^[a-z_]+:(sys_enter_)?", "", $2); printf "    %-18s %.2f\n", $2, $1 / n}'
  done
fi
