#!/usr/bin/env bash
# bench.sh — the cost of meshtun's capture path, measured against the direct
# path in the same run.
#
# Builds two network namespaces joined by a veth:
#   mtb-pod  eth0 10.77.0.2/24 fd77::2/64, default route via mtb-svc
#   mtb-svc  eth0 10.77.0.1/24 fd77::1/64, runs `iperf3 -s` and `rrbench server`
# then, for BENCH_ROUNDS rounds, measures from the pod with no proxy
# (DIRECT), through the classic sidecar path (REDIRECT: iptables nat OUTPUT
# REDIRECT to `rrbench redirect`, a minimal proxy on kernel sockets that
# splices), and with `meshtun proxy` capturing the pod (CAPTURE, and VIP:
# through a service listener); the order flips every round so drift hits
# every side alike:
#   iperf3 1 stream and 4 streams (bits/s received; both directions, with the
#   measured proxy's CPU seconds per GB), 64-byte request/response
#   latency on one connection (p50/p99), new connection + one RR (p50/p99;
#   each connect row to a destination port of its own, see CONNECT_PORT_BASE).
# The "load" test measures the cost of the proxy process itself, Istio's
# published yardstick: HTTP/1.1 keep-alive at a fixed BENCH_HTTP_RATE for
# BENCH_LOAD_SECONDS through the http_connection_manager (vip) and through
# plain TCP capture (capture, L4); utime+stime from /proc/<pid>/stat before
# and after give vCPU (CPU seconds per second) per 1,000 req/s, VmRSS at the
# end the RSS under load; idle RSS is read before any traffic but the
# readiness probe. The REDIRECT reference proxy is measured the same way.
# Prints medians across rounds and writes them to $BENCH_OUT/bench-results.txt.
#
# Needs root, ip (iproute2), iperf3, iptables, awk, go (to build integration/cmd/rrbench).
# Environment:
#   BENCH_ROUNDS=3  BENCH_SECONDS=5  (iperf3 -t)
#   BENCH_RR_N=20000  BENCH_CONNECT_N=2000   samples per latency test
#   MESHTUN_BIN=bin/meshtun  MTU=   (passed as --tun-mtu when set)
#   MESHTUN_LOG_LEVEL=warn   level of the measured proxies (info would add
#                            an access-log line per flow)
#   MESHTUN_ARGS=            extra `meshtun proxy` flags (word-split)
#   BENCH_DIRECT_ONLY=1      skip everything that needs the proxy
#   BENCH_OUT=/tmp/meshtun-bench   logs, raw iperf3 JSON, results
#   BENCH_LOAD_SECONDS=30    duration of the fixed-rate CPU/RSS load test
#   BENCH_TESTS="tcp tcpr rr connect http load"   which measurements to run
#                            (tcpr: iperf3 -R, the service sends to the pod)
#   BENCH_HTTP_RBAC=1        the vip HTTP listener runs one istiod-shaped
#                            ALLOW envoy.filters.http.rbac policy (method,
#                            path, source IP) before the router: compare its
#                            HTTP rows with a run without it
set -euo pipefail

cd "$(dirname "$0")/.."

ROUNDS=${BENCH_ROUNDS:-3}
TESTS=" ${BENCH_TESTS:-tcp tcpr rr connect http load} "
LOAD_SECONDS=${BENCH_LOAD_SECONDS:-30}
SECONDS_PER_TEST=${BENCH_SECONDS:-5}
RR_N=${BENCH_RR_N:-20000}
CONNECT_N=${BENCH_CONNECT_N:-2000}
BIN=${MESHTUN_BIN:-bin/meshtun}
LOG_LEVEL=${MESHTUN_LOG_LEVEL:-warn}
DIRECT_ONLY=${BENCH_DIRECT_ONLY:-0}
OUT=${BENCH_OUT:-/tmp/meshtun-bench}
GO=${GO:-go}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-30}

POD=mtb-pod
SVC=mtb-svc
SVC_IP=10.77.0.1
RR_PORT=7777
# Each connect row (round, mode) dials a destination port of its own: a
# row leaves about 2 x BENCH_CONNECT_N TIME_WAIT sockets in the pod for 60 s,
# and on one shared port a later row's connect() (the app's, and the
# proxy's upstream) would probe past all of them for a free source port
# (the kernel's ~14k even ports fill within a round): that measured the
# earlier rows, not the path.
CONNECT_PORT_BASE=7800
IPERF_PORT=5201
HTTP_PORT=8080
HTTP_RATE=${BENCH_HTTP_RATE:-1000}
# The "vip" mode runs the proxy on a bootstrap where this VIP (owned by no
# interface) is a service listener whose STATIC cluster is SVC_IP: the
# mesh path (hand-off, filter chain, cluster) instead of passthrough.
VIP=10.77.9.10
TARGET=$SVC_IP
TUN=meshtun0

log() { printf '%s bench: %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "FAIL: $*"
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth, TUN)"
for c in ip iperf3 iptables awk "$GO"; do
	command -v "$c" >/dev/null 2>&1 || die "$c not found (make deps installs iproute2, iperf3 and iptables)"
done
case $ROUNDS in '' | *[!0-9]* | 0) die "BENCH_ROUNDS=$ROUNDS: want a positive integer" ;; esac
case $SECONDS_PER_TEST in '' | *[!0-9]* | 0) die "BENCH_SECONDS=$SECONDS_PER_TEST: want a positive integer" ;; esac
case $LOAD_SECONDS in '' | *[!0-9]* | 0) die "BENCH_LOAD_SECONDS=$LOAD_SECONDS: want a positive integer" ;; esac
case $HTTP_RATE in '' | *[!0-9]* | 0) die "BENCH_HTTP_RATE=$HTTP_RATE: want a positive integer" ;; esac
CLK_TCK=$(getconf CLK_TCK)

if [ "$DIRECT_ONLY" != 1 ]; then
	[ -x "$BIN" ] || die "MESHTUN_BIN=$BIN is not executable (run make build, or BENCH_DIRECT_ONLY=1)"
	BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
	help=$("$BIN" proxy -h 2>&1 || true)
	grep -q -- '-tun-mtu' <<<"$help" ||
		die "$BIN has no 'proxy' command with --tun-mtu (use BENCH_DIRECT_ONLY=1 until it does)"
fi

mkdir -p "$OUT"
rm -rf "${OUT:?}"/round* "$OUT"/proxy-*.log "$OUT"/samples.tsv "$OUT"/state
SAMPLES=$OUT/samples.tsv
RESULTS=$OUT/bench-results.txt
: >"$SAMPLES"

log "building rrbench"
"$GO" build -o "$OUT/rrbench" ./integration/cmd/rrbench
RRB=$OUT/rrbench

# ---------------------------------------------------------------- cleanup
PIDS=()
PROXY_PID=

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	for pid in $PROXY_PID "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null
	done
	for pid in $PROXY_PID "${PIDS[@]}"; do
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	for ns in $POD $SVC; do
		if [ -e "/run/netns/$ns" ]; then
			# Anything still running in our namespaces was started by this script.
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
			ip netns del "$ns"
		fi
	done
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- topology
for ns in $POD $SVC; do
	if [ -e "/run/netns/$ns" ]; then
		log "removing $ns left by an earlier run"
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
		ip netns del "$ns"
	fi
done
ip link del mtbp0 2>/dev/null || true

log "creating namespaces $POD and $SVC"
ip netns add $POD
ip netns add $SVC
ip link add mtbp0 type veth peer name mtbs0
ip link set mtbp0 netns $POD
ip link set mtbs0 netns $SVC
ip -n $POD link set mtbp0 name eth0
ip -n $SVC link set mtbs0 name eth0
for ns in $POD $SVC; do
	ip -n $ns link set lo up
	ip -n $ns link set eth0 up
done
ip -n $POD addr add 10.77.0.2/24 dev eth0
ip -n $POD addr add fd77::2/64 dev eth0 nodad
ip -n $SVC addr add $SVC_IP/24 dev eth0
ip -n $SVC addr add fd77::1/64 dev eth0 nodad
ip -n $POD route add default via $SVC_IP
ip -n $POD -6 route add default via fd77::1

in_pod() { ip netns exec $POD "$@"; }

ip netns exec $SVC iperf3 -s -p $IPERF_PORT >"$OUT/iperf3-server.log" 2>&1 &
PIDS+=($!)
CONNECT_LISTEN=""
for i in $(seq 0 $((4 * ROUNDS - 1))); do CONNECT_LISTEN+=",:$((CONNECT_PORT_BASE + i))"; done
ip netns exec $SVC "$RRB" server -listen ":$RR_PORT$CONNECT_LISTEN" >"$OUT/rrbench-server.log" 2>&1 &
PIDS+=($!)
ip netns exec $SVC "$RRB" httpserver -listen ":$HTTP_PORT" >"$OUT/rrbench-httpserver.log" 2>&1 &
PIDS+=($!)

# Both servers answer before anything is measured.
for i in $(seq 50); do
	if in_pod "$RRB" client -addr $SVC_IP:$RR_PORT -n 1 -warmup 0 -timeout 1s >/dev/null 2>&1 &&
		ip netns exec $SVC ss -ltnH "sport = :$IPERF_PORT" | grep -q .; then
		break
	fi
	[ "$i" -lt 50 ] || die "servers in $SVC did not come up (see $OUT/*-server.log)"
	sleep 0.1
done

# ---------------------------------------------------------------- proxy
rules() { ip -n $POD rule show; ip -n $POD -6 rule show; }

# info_suppressed LEVEL: true when LEVEL hides info lines (such as "proxy ready").
info_suppressed() {
	case $(printf '%s' "$1" | tr 'A-Z' 'a-z') in trace | debug | info | '') return 1 ;; *) return 0 ;; esac
}

# start_proxy LOG LEVEL: runs meshtun proxy in the pod, returns once it
# captures; sets PROXY_PID and READY_HOW.
start_proxy() {
	local plog=$1 level=$2 base
	local args=(proxy --log-format json --log-level "$level" --state-dir "$OUT/state")
	[ -z "${MTU:-}" ] || args+=(--tun-mtu "$MTU")
	# shellcheck disable=SC2206 # MESHTUN_ARGS is word-split on purpose
	[ -z "${MESHTUN_ARGS:-}" ] || args+=($MESHTUN_ARGS)
	! ip -n $POD link show $TUN >/dev/null 2>&1 || die "$TUN already exists in $POD: an earlier proxy is still running"
	base=$(rules)
	# Not through a shell function: $! must be the proxy itself (ip netns
	# exec execs it), so that SIGTERM reaches meshtun.
	ip netns exec $POD "$BIN" "${args[@]}" >"$plog" 2>&1 &
	PROXY_PID=$!
	READY_HOW=
	local t0 i
	t0=$(date +%s%N)
	for i in $(seq $((READY_TIMEOUT * 20))); do
		if ! kill -0 "$PROXY_PID" 2>/dev/null; then
			tail -n 20 "$plog" >&2
			die "meshtun proxy exited before it was ready (log: $plog)"
		fi
		if grep -q '"message":"proxy ready"' "$plog"; then
			READY_HOW="ready line"
			break
		fi
		# At a level that hides the info-level ready line, the proxy is up
		# once its TUN exists and capture has changed the routing rules;
		# the probe below then proves the path answers.
		if info_suppressed "$level" && [ "$(rules)" != "$base" ] && ip -n $POD link show $TUN >/dev/null 2>&1; then
			READY_HOW="routing rules changed (ready line hidden at --log-level $level)"
			break
		fi
		sleep 0.05
	done
	[ -n "$READY_HOW" ] || {
		tail -n 20 "$plog" >&2
		die "meshtun proxy not ready after ${READY_TIMEOUT}s (log: $plog)"
	}
	READY_MS=$((($(date +%s%N) - t0) / 1000000))
	[ "/proc/$PROXY_PID/exe" -ef "$BIN" ] || die "pid $PROXY_PID is not $BIN"
	# One exchange through the capture path before anything is timed.
	for i in $(seq 10); do
		in_pod "$RRB" client -addr $SVC_IP:$RR_PORT -n 1 -warmup 0 -timeout 3s >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	die "no request/response through the capture path (log: $plog)"
}

# stop_proxy: SIGTERM, wait; the proxy must exit 0 and undo capture.
stop_proxy() {
	local pid=$PROXY_PID rc=0 i
	kill -TERM "$pid"
	for i in $(seq 150); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "WARNING: proxy did not exit 15s after SIGTERM; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" || rc=$?
	PROXY_PID=
	[ "$rc" -eq 0 ] || log "WARNING: proxy exited $rc after SIGTERM"
	[ "$(rules)" = "$BASE_RULES" ] || log "WARNING: routing rules in $POD differ from before the proxy ran"
	! ip -n $POD link show $TUN >/dev/null 2>&1 || log "WARNING: $TUN still exists after the proxy exited"
}

tun_tx_bytes() { in_pod cat /sys/class/net/$TUN/statistics/tx_bytes 2>/dev/null || echo 0; }

# ---------------------------------------------------------------- measuring
sample() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SAMPLES"; }
jfield() { sed -n "s/.*\"$2\":\\([0-9.eE+-]*\).*/\\1/p" <<<"$1"; }

# iperf FILE ARGS…: one iperf3 run (retried once), prints received bits/s.
iperf() {
	local f=$1
	shift
	local try
	for try in 1 2; do
		if in_pod iperf3 -c $TARGET -p $IPERF_PORT -t "$SECONDS_PER_TEST" -J "$@" >"$f" 2>&1 && "$RRB" iperfsum "$f"; then
			return 0
		fi
		log "iperf3 $* failed (try $try, output $f)"
		sleep 1
	done
	return 1
}

# cpu_mark notes the measured process's CPU time; cpu_per_gb ROUND MODE
# ROW BPS then samples ROW_cpu_gb, its CPU seconds since the mark per GB
# received (BPS over the iperf3 run), nothing for direct (no process).
cpu_mark() {
	CPU_MARK_C=
	[ -z "$MEASURED_PID" ] || CPU_MARK_C=$(proc_cpu_ticks "$MEASURED_PID")
}
cpu_per_gb() {
	[ -n "$CPU_MARK_C" ] || return 0
	local c1
	c1=$(proc_cpu_ticks "$MEASURED_PID")
	sample "$1" "$2" "$3_cpu_gb" "$(awk -v c=$((c1 - CPU_MARK_C)) -v hz="$CLK_TCK" -v s="$SECONDS_PER_TEST" -v b="$4" \
		'BEGIN { printf "%.3f", (c / hz) / (b / 8 * s / 1e9) }')"
}

# connect_port ROUND MODE: the destination port of that connect row.
connect_port() {
	local i
	case $2 in
	direct) i=0 ;;
	redirect) i=1 ;;
	capture) i=2 ;;
	vip) i=3 ;;
	*) die "connect_port: unknown mode $2" ;;
	esac
	echo $((CONNECT_PORT_BASE + ($1 - 1) * 4 + i))
}

measure() { # measure ROUND MODE
	local r=$1 mode=$2 dir=$OUT/round$1 bps j
	mkdir -p "$dir"
	# First, so that the RSS under load is not the high-water mark of the
	# throughput tests.
	if [[ $TESTS == *" load "* && -n $MEASURED_PID ]]; then
		measure_load "$r" "$mode"
	fi
	if [[ $TESTS == *" tcp "* ]]; then
	log "round $r/$ROUNDS $mode: iperf3 1 stream"
	cpu_mark
	bps=$(iperf "$dir/$mode-iperf-P1.json") || die "iperf3 failed"
	sample "$r" "$mode" tput1 "$bps"
	cpu_per_gb "$r" "$mode" tput1 "$bps"
	log "round $r/$ROUNDS $mode: iperf3 4 streams"
	cpu_mark
	bps=$(iperf "$dir/$mode-iperf-P4.json" -P 4) || die "iperf3 -P 4 failed"
	sample "$r" "$mode" tput4 "$bps"
	cpu_per_gb "$r" "$mode" tput4 "$bps"
	fi
	if [[ $TESTS == *" tcpr "* ]]; then
	# The download direction (iperf3 -R: the service sends): the proxy
	# writes the data into the pod, through the TUN under capture.
	log "round $r/$ROUNDS $mode: iperf3 1 stream, reverse"
	cpu_mark
	bps=$(iperf "$dir/$mode-iperf-R1.json" -R) || die "iperf3 -R failed"
	sample "$r" "$mode" tputr1 "$bps"
	cpu_per_gb "$r" "$mode" tputr1 "$bps"
	log "round $r/$ROUNDS $mode: iperf3 4 streams, reverse"
	cpu_mark
	bps=$(iperf "$dir/$mode-iperf-R4.json" -R -P 4) || die "iperf3 -R -P 4 failed"
	sample "$r" "$mode" tputr4 "$bps"
	cpu_per_gb "$r" "$mode" tputr4 "$bps"
	fi
	if [[ $TESTS == *" rr "* ]]; then
	log "round $r/$ROUNDS $mode: rrbench 64 B x $RR_N"
	j=$(in_pod "$RRB" client -addr $TARGET:$RR_PORT -size 64 -n "$RR_N" -warmup 1000) || die "rrbench client failed"
	echo "$j" >"$dir/$mode-rr.json"
	sample "$r" "$mode" rr_p50 "$(jfield "$j" p50_us)"
	sample "$r" "$mode" rr_p99 "$(jfield "$j" p99_us)"
	fi
	if [[ $TESTS == *" connect "* ]]; then
	local cport
	cport=$(connect_port "$r" "$mode")
	log "round $r/$ROUNDS $mode: rrbench -connect x $CONNECT_N (port $cport)"
	j=$(in_pod "$RRB" client -addr $TARGET:$cport -size 64 -n "$CONNECT_N" -warmup 100 -connect) || die "rrbench -connect failed"
	echo "$j" >"$dir/$mode-connect.json"
	sample "$r" "$mode" conn_p50 "$(jfield "$j" p50_us)"
	sample "$r" "$mode" conn_p99 "$(jfield "$j" p99_us)"
	fi
	[[ $TESTS == *" http "* ]] || return 0
	# HTTP/1.1 keep-alive: in vip mode through the http_connection_manager
	# (0.0.0.0-style listener with routes), elsewhere plain TCP.
	log "round $r/$ROUNDS $mode: HTTP/1.1 at $HTTP_RATE req/s, 10 connections"
	j=$(in_pod "$RRB" httpclient -url "http://$TARGET:$HTTP_PORT/" -host svc -conns 10 -rate "$HTTP_RATE" -duration "${SECONDS_PER_TEST}s") || die "httpclient failed"
	echo "$j" >"$dir/$mode-http-rate.json"
	sample "$r" "$mode" http_p50 "$(jfield "$j" p50_us)"
	sample "$r" "$mode" http_p99 "$(jfield "$j" p99_us)"
	log "round $r/$ROUNDS $mode: HTTP/1.1 as fast as possible, 10 connections"
	j=$(in_pod "$RRB" httpclient -url "http://$TARGET:$HTTP_PORT/" -host svc -conns 10 -rate 0 -duration "${SECONDS_PER_TEST}s") || die "httpclient failed"
	echo "$j" >"$dir/$mode-http-max.json"
	sample "$r" "$mode" http_rps "$(jfield "$j" rps)"
}

# proc_cpu_ticks PID: utime+stime of PID in clock ticks (fields 14 and 15
# of /proc/PID/stat, counted after the ")" that ends the command name).
proc_cpu_ticks() {
	local st
	st=$(cat "/proc/$1/stat") || die "pid $1 is gone: no CPU time to read"
	st=${st##*) }
	awk '{ print $12 + $13 }' <<<"$st"
}

# proc_kb PID FIELD: a /proc/PID/status field in kB (VmRSS, VmHWM).
proc_kb() { awk -v k="$2:" '$1 == k { print $2; exit }' "/proc/$1/status"; }

# MEASURED_PID is the proxy process of the mode being measured (empty for
# direct); set by measure_capture, measure_vip and measure_redirect.
MEASURED_PID=

# idle_rss MODE: the measured process's RSS before any traffic but the
# readiness probe, after a second to settle.
idle_rss() {
	sleep 1
	sample "$R" "$1" idle_rss_kb "$(proc_kb "$MEASURED_PID" VmRSS)"
}

# measure_load ROUND MODE: HTTP/1.1 keep-alive at a fixed HTTP_RATE for
# LOAD_SECONDS; the measured process's CPU time over the run, per 1,000
# req/s actually served, and its RSS at the end.
measure_load() {
	local r=$1 mode=$2 dir=$OUT/round$1 j t0 t1 c0 c1 rps wall
	log "round $r/$ROUNDS $mode: CPU and RSS at $HTTP_RATE req/s for ${LOAD_SECONDS}s (pid $MEASURED_PID)"
	c0=$(proc_cpu_ticks "$MEASURED_PID")
	t0=$(date +%s%N)
	j=$(in_pod "$RRB" httpclient -url "http://$TARGET:$HTTP_PORT/" -host svc -conns 10 -rate "$HTTP_RATE" -duration "${LOAD_SECONDS}s") || die "httpclient (load) failed"
	t1=$(date +%s%N)
	c1=$(proc_cpu_ticks "$MEASURED_PID")
	echo "$j" >"$dir/$mode-load.json"
	rps=$(jfield "$j" rps)
	[ "$(jfield "$j" errors)" = 0 ] || die "$mode load: $(jfield "$j" errors) HTTP errors ($dir/$mode-load.json)"
	wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }')
	# vCPU per 1,000 req/s = (CPU s / wall s) * 1000 / achieved req/s.
	sample "$r" "$mode" load_vcpu "$(awk -v c=$((c1 - c0)) -v hz="$CLK_TCK" -v w="$wall" -v q="$rps" 'BEGIN { printf "%.5f", (c / hz / w) * 1000 / q }')"
	sample "$r" "$mode" load_rps "$rps"
	sample "$r" "$mode" load_rss_kb "$(proc_kb "$MEASURED_PID" VmRSS)"
	sample "$r" "$mode" load_hwm_kb "$(proc_kb "$MEASURED_PID" VmHWM)"
}

measure_capture() { # measure_capture ROUND
	local r=$1 before after
	start_proxy "$OUT/proxy-round$r.log" "$LOG_LEVEL"
	log "round $r/$ROUNDS capture: proxy ready in ${READY_MS} ms ($READY_HOW)"
	MEASURED_PID=$PROXY_PID R=$r idle_rss capture
	before=$(tun_tx_bytes)
	MEASURED_PID=$PROXY_PID measure "$r" capture
	after=$(tun_tx_bytes)
	# Proof the measured traffic went through the TUN, not around it.
	[ $((after - before)) -gt 100000 ] ||
		die "only $((after - before)) bytes went into $TUN during the capture measurements: capture is not active"
	sample "$r" capture tun_bytes $((after - before))
	stop_proxy
}

# vip_bootstrap writes the bootstrap of the "vip" mode.
vip_bootstrap() {
	local f=$OUT/vip-bootstrap.json listeners="" clusters="" port
	for port in $IPERF_PORT $RR_PORT $(seq $CONNECT_PORT_BASE $((CONNECT_PORT_BASE + 4 * ROUNDS - 1))); do
		listeners+="${listeners:+,}{\"name\":\"${VIP}_$port\",\"address\":{\"socket_address\":{\"address\":\"$VIP\",\"port_value\":$port}},\"bind_to_port\":false,\"traffic_direction\":\"OUTBOUND\",\"filter_chains\":[{\"filters\":[{\"name\":\"envoy.filters.network.tcp_proxy\",\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\",\"stat_prefix\":\"svc$port\",\"cluster\":\"outbound|$port||svc\"}}]}]}"
		clusters+=",{\"name\":\"outbound|$port||svc\",\"type\":\"STATIC\",\"connect_timeout\":\"5s\",\"load_assignment\":{\"cluster_name\":\"outbound|$port||svc\",\"endpoints\":[{\"lb_endpoints\":[{\"endpoint\":{\"address\":{\"socket_address\":{\"address\":\"$SVC_IP\",\"port_value\":$port}}}}]}]}}"
	done
	local authz=""
	if [ "${BENCH_HTTP_RBAC:-0}" = 1 ]; then
		authz="{\"name\":\"envoy.filters.http.rbac\",\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\",\"rules\":{\"policies\":{\"ns[default]-policy[bench]-rule[0]\":{\"permissions\":[{\"and_rules\":{\"rules\":[{\"or_rules\":{\"rules\":[{\"header\":{\"name\":\":method\",\"string_match\":{\"exact\":\"GET\"}}}]}},{\"or_rules\":{\"rules\":[{\"url_path\":{\"path\":{\"prefix\":\"/\"}}}]}}]}}],\"principals\":[{\"and_ids\":{\"ids\":[{\"or_ids\":{\"ids\":[{\"direct_remote_ip\":{\"address_prefix\":\"0.0.0.0\",\"prefix_len\":0}}]}}]}}]}}},\"shadow_rules_stat_prefix\":\"istio_dry_run_allow_\"}},"
	fi
	listeners+=",{\"name\":\"${VIP}_$HTTP_PORT\",\"address\":{\"socket_address\":{\"address\":\"$VIP\",\"port_value\":$HTTP_PORT}},\"bind_to_port\":false,\"traffic_direction\":\"OUTBOUND\",\"filter_chains\":[{\"filters\":[{\"name\":\"envoy.filters.network.http_connection_manager\",\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\",\"stat_prefix\":\"outbound_$HTTP_PORT\",\"route_config\":{\"name\":\"$HTTP_PORT\",\"virtual_hosts\":[{\"name\":\"svc\",\"domains\":[\"*\"],\"routes\":[{\"match\":{\"prefix\":\"/\"},\"route\":{\"cluster\":\"outbound|$HTTP_PORT||svc\"}}]}]},\"http_filters\":[$authz{\"name\":\"envoy.filters.http.router\",\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\"}}]}}]}]}"
	clusters+=",{\"name\":\"outbound|$HTTP_PORT||svc\",\"type\":\"STATIC\",\"connect_timeout\":\"5s\",\"load_assignment\":{\"cluster_name\":\"outbound|$HTTP_PORT||svc\",\"endpoints\":[{\"lb_endpoints\":[{\"endpoint\":{\"address\":{\"socket_address\":{\"address\":\"$SVC_IP\",\"port_value\":$HTTP_PORT}}}}]}]}}"
	cat >"$f" <<JSON
{"static_resources":{"listeners":[
 {"name":"virtualOutbound","address":{"socket_address":{"address":"0.0.0.0","port_value":15001}},"use_original_dst":true,
  "filter_chains":[{"filters":[{"name":"envoy.filters.network.tcp_proxy","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy","stat_prefix":"PassthroughCluster","cluster":"PassthroughCluster"}}]}]},
 $listeners],
 "clusters":[{"name":"PassthroughCluster","type":"ORIGINAL_DST","lb_policy":"CLUSTER_PROVIDED","connect_timeout":"5s"}$clusters]}}
JSON
	echo "$f"
}

measure_vip() { # measure_vip ROUND
	local r=$1 saved=${MESHTUN_ARGS:-}
	MESHTUN_ARGS="$saved --bootstrap $(vip_bootstrap)"
	start_proxy "$OUT/proxy-vip-round$r.log" "$LOG_LEVEL"
	MESHTUN_ARGS=$saved
	log "round $r/$ROUNDS vip: proxy ready in ${READY_MS} ms ($READY_HOW)"
	MEASURED_PID=$PROXY_PID R=$r idle_rss vip
	TARGET=$VIP
	MEASURED_PID=$PROXY_PID measure "$r" vip
	TARGET=$SVC_IP
	stop_proxy
}

# measure_redirect ROUND: the iptables REDIRECT reference. The NAT rule
# sends the pod's TCP to SVC_IP through `rrbench redirect` (its own
# upstream sockets carry mark 0x539, which the rule skips).
REDIR_PORT=15101
measure_redirect() {
	local r=$1 pid i nat
	ip netns exec $POD "$RRB" redirect -listen "0.0.0.0:$REDIR_PORT" >"$OUT/redirect-round$r.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	for i in $(seq 50); do
		ip netns exec $POD ss -ltnH "sport = :$REDIR_PORT" | grep -q . && break
		[ "$i" -lt 50 ] || die "rrbench redirect did not listen (log: $OUT/redirect-round$r.log)"
		sleep 0.1
	done
	in_pod iptables -t nat -A OUTPUT -p tcp -d $SVC_IP -m mark ! --mark 0x539 -j REDIRECT --to-ports $REDIR_PORT
	MEASURED_PID=$pid R=$r idle_rss redirect
	MEASURED_PID=$pid measure "$r" redirect
	# Proof the measured connections were redirected: the NAT rule's
	# packet count (the first packet of each connection).
	nat=$(in_pod iptables -t nat -L OUTPUT -v -x -n | awk '/REDIRECT/ { print $1; exit }')
	in_pod iptables -t nat -D OUTPUT -p tcp -d $SVC_IP -m mark ! --mark 0x539 -j REDIRECT --to-ports $REDIR_PORT
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	[ "${nat:-0}" -gt 0 ] || die "the REDIRECT rule matched no connection: the reference was not measured"
	sample "$r" redirect nat_conns "$nat"
}

BASE_RULES=$(rules)
OFFLOADS="n/a (BENCH_DIRECT_ONLY=1)"
STARTUP="n/a"
if [ "$DIRECT_ONLY" != 1 ]; then
	# A first start at info level shows the TUN's offloads, and checks the
	# ready line the measured (warn-level) runs may not print.
	log "probe start of the proxy at --log-level info"
	start_proxy "$OUT/proxy-probe.log" info
	STARTUP="${READY_MS} ms to \"proxy ready\""
	line=$(grep -m1 '"message":"tun device open"' "$OUT/proxy-probe.log" || true)
	if [ -n "$line" ]; then
		OFFLOADS=""
		for k in name mtu vnet_hdr tso gro batch_size; do
			v=$(sed -n "s/.*\"$k\":\"\{0,1\}\([^\",}]*\).*/\1/p" <<<"$line")
			OFFLOADS+="${OFFLOADS:+ }$k=${v:-?}"
		done
	else
		OFFLOADS="unknown (no \"tun device open\" line in $OUT/proxy-probe.log)"
	fi
	log "tun: $OFFLOADS"
	stop_proxy
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
	if [ "$DIRECT_ONLY" = 1 ]; then
		measure "$r" direct
	elif [ $((r % 2)) -eq 1 ]; then
		measure "$r" direct
		measure_redirect "$r"
		measure_capture "$r"
		measure_vip "$r"
	else
		measure_vip "$r"
		measure_capture "$r"
		measure_redirect "$r"
		measure "$r" direct
	fi
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
# median MODE METRIC: the median over rounds, or "-" without samples.
median() {
	awk -F'\t' -v m="$1" -v k="$2" '$2 == m && $3 == k { print $4 }' "$SAMPLES" | sort -g |
		awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# row LABEL METRIC KIND(tput|lat): medians per mode; for throughput the
# ratios capture/direct, capture/redirect (>= 1 means meshtun is at least
# as fast as the path it replaces) and vip/capture; for latency the
# differences in microseconds.
row() {
	local d x c v
	d=$(median direct "$2")
	x=$(median redirect "$2")
	c=$(median capture "$2")
	v=$(median vip "$2")
	awk -v label="$1" -v d="$d" -v x="$x" -v c="$c" -v v="$v" -v kind="$3" '
	function num(a, s) { return (a == "-") ? "-" : sprintf(s, (kind == "tput") ? a / 1e9 : a) }
	function cmp(a, b) {
		if (a == "-" || b == "-") return "-"
		if (kind == "tput") return (b == 0) ? "-" : sprintf("%.3fx", a / b)
		return sprintf("%+.1f us", a - b)
	}
	BEGIN {
		f = (kind == "tput") ? "%.2f" : "%.1f"
		printf "%-26s | %9s | %9s | %9s | %9s | %-11s | %-11s | %s\n", label, num(d, f), num(x, f), num(c, f), num(v, f), cmp(c, d), cmp(c, x), cmp(v, c)
	}'
}

# lrow LABEL METRIC DIVISOR FORMAT NOTE: medians of a per-process metric for
# the three proxied modes, divided by DIVISOR.
lrow() {
	local x c v
	x=$(median redirect "$2")
	c=$(median capture "$2")
	v=$(median vip "$2")
	awk -v label="$1" -v x="$x" -v c="$c" -v v="$v" -v div="$3" -v f="$4" -v note="$5" '
	function num(a) { return (a == "-") ? "-" : sprintf(f, a / div) }
	BEGIN { printf "%-34s | %9s | %9s | %9s | %s\n", label, num(x), num(c), num(v), note }'
}

{
	echo "meshtun bench $(date -u +%FT%TZ)  host: $(nproc) CPUs, kernel $(uname -r)"
	if [ "$DIRECT_ONLY" != 1 ]; then
		echo "binary: $BIN ($("$BIN" version 2>/dev/null || echo '?')), tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
		echo "proxy: --log-level $LOG_LEVEL${MTU:+ --tun-mtu $MTU}${MESHTUN_ARGS:+ $MESHTUN_ARGS}; startup $STARTUP"
		echo "tun device open: $OFFLOADS"
	else
		echo "BENCH_DIRECT_ONLY=1: capture half skipped"
	fi
	echo "rounds: $ROUNDS (medians shown), iperf3 -t $SECONDS_PER_TEST, RR n=$RR_N, connect n=$CONNECT_N; loadavg $LOAD_START -> $LOAD_END"
	echo
	printf "%-26s | %9s | %9s | %9s | %9s | %-11s | %-11s | %s\n" metric direct redirect capture vip "cap/direct" "cap/redir" "vip/cap"
	printf '%s\n' "---------------------------+-----------+-----------+-----------+-----------+-------------+-------------+------------"
	row "TCP 1 stream (Gbit/s)" tput1 tput
	row "TCP 4 streams (Gbit/s)" tput4 tput
	row "TCP 1 stream, -R (Gbit/s)" tputr1 tput
	row "TCP 4 streams, -R (Gbit/s)" tputr4 tput
	row "RR 64 B p50 (us)" rr_p50 lat
	row "RR 64 B p99 (us)" rr_p99 lat
	row "connect+RR p50 (us)" conn_p50 lat
	row "connect+RR p99 (us)" conn_p99 lat
	row "HTTP @${HTTP_RATE}/s p50 (us)" http_p50 lat
	row "HTTP @${HTTP_RATE}/s p99 (us)" http_p99 lat
	if [[ $TESTS == *" load "* ]]; then
		echo
		echo "Proxy process cost per 1,000 HTTP/1.1 req/s (fixed $HTTP_RATE req/s, 10 keep-alive conns, ${LOAD_SECONDS}s; utime+stime from /proc):"
		printf "%-34s | %9s | %9s | %9s | %s\n" metric redirect "capture" "vip (HCM)" "goal / Istio's published figures"
		printf '%s\n' "-----------------------------------+-----------+-----------+-----------+------------------------------------------"
		lrow "vCPU per 1,000 req/s" load_vcpu 1 "%.3f" "goal: <= 0.10 HTTP (vip), <= 0.05 L4 (capture); Envoy sidecar 0.20, ztunnel 0.06"
		lrow "RSS under load (MB)" load_rss_kb 1024 "%.1f" "goal: <= 40 HTTP; Envoy sidecar 60, ztunnel 12"
		lrow "RSS high-water mark (MB)" load_hwm_kb 1024 "%.1f" ""
		lrow "idle RSS (MB)" idle_rss_kb 1024 "%.1f" "goal: <= 20"
		lrow "req/s achieved" load_rps 1 "%.0f" ""
	fi
	if [[ $TESTS == *" tcp "* || $TESTS == *" tcpr "* ]]; then
		echo
		echo "Proxy CPU seconds per GB received during the iperf3 rows (utime+stime from /proc):"
		printf "%-34s | %9s | %9s | %9s | %s\n" metric redirect "capture" "vip" ""
		printf '%s\n' "-----------------------------------+-----------+-----------+-----------+------------------------------------------"
		lrow "TCP 1 stream" tput1_cpu_gb 1 "%.3f" ""
		lrow "TCP 4 streams" tput4_cpu_gb 1 "%.3f" ""
		lrow "TCP 1 stream, -R" tputr1_cpu_gb 1 "%.3f" ""
		lrow "TCP 4 streams, -R" tputr4_cpu_gb 1 "%.3f" ""
	fi
	[[ $TESTS != *" http "* ]] ||
	awk -F'\t' '$3 == "http_rps" { v[$2] = v[$2] " " int($4) } END { printf "HTTP max req/s per round (10 conns): direct%s | redirect%s | capture%s | vip (HCM)%s\n", v["direct"], v["redirect"], v["capture"], v["vip"] }' "$SAMPLES"
	echo
	echo "per round (round mode metric value): $SAMPLES"
} >"$RESULTS"

echo
cat "$RESULTS"
echo
echo "results: $RESULTS (raw iperf3/rrbench output and proxy logs in $OUT)"
