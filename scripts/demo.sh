#!/usr/bin/env bash
# demo.sh — `make demo`: meshtun end to end on one machine, on an embedded
# default (a sample registry and the built-in profiles), asserting each
# step. Throwaway network namespaces stand in for a pod, the cluster's
# services and the outside world; the host's own network is never changed.
#
#   mtd-pod  10.78.0.2      the pod: meshtun agent (+ its proxy) captures it
#   mtd-svc  10.78.0.1      meshtun controlplane (:15010 ADS, 127.0.0.1:15014 API)
#            10.78.1.10/11  reviews v1 and v2, endpoints of VIP 10.96.0.20:9080
#   mtd-ext  10.78.2.10     an external server nobody registered
#   mtd-a    10.78.3.2      with DEMO_MTLS=1: a meshed pod (client), agent on :15012
#   mtd-b    10.78.4.2      with DEMO_MTLS=1: a meshed pod (server-b :8080, service
#                           hello, VIP 10.96.0.30:80), agent on :15012
#
# Needs root, iproute2, curl and procps (scripts/install-deps.sh). Everything
# it started and created is removed on exit, Ctrl-C included: the processes
# get SIGTERM (the agent then removes its capture) and SIGKILL only after a
# bounded wait, the namespaces are deleted, and the host's network — links,
# addresses, rules and routes, IPv4 and IPv6 — is asserted unchanged.
#
# For CI:
#   DEMO_MTLS=1                  also run mtls_steps (11-16): workload identities
#                                and mutual TLS between two meshed pods, PERMISSIVE
#                                then STRICT; they need the proxy's TLS data path
#   DEMO_INTERRUPT_AT=POINT      send SIGINT to the demo's process group (what a
#                                Ctrl-C does) at POINT: a step number ("5") or
#                                one of 1.veth, 4.agent; exits 130 after cleanup
#   DEMO_INTERRUPT_TEST="P ..."  run the demo interrupted at each point in its
#                                own session and assert that nothing is left
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."

BIN=${MESHTUN_BIN:-bin/meshtun}
DEMOSERVER=${DEMOSERVER_BIN:-bin/demoserver}
POD=mtd-pod SVC=mtd-svc EXT=mtd-ext PODA=mtd-a PODB=mtd-b
VIP=10.96.0.20
HELLO_VIP=10.96.0.30
DEMO_MTLS=${DEMO_MTLS:-0}
EXT_IP=10.78.2.10
DIR=
PIDS=()
AGENT_PID=
FAILED=0
HOST_BEFORE=
POD_BEFORE=

B='' G='' R='' N=''
if [ -t 1 ]; then B='\033[1m' G='\033[32m' R='\033[31m' N='\033[0m'; fi
say() { printf "\n${B}== %s${N}\n" "$*"; }
ok() { printf "   ${G}ok${N}   %s\n" "$*"; }
fail() {
	printf "   ${R}FAIL${N} %s\n" "$*"
	FAILED=1
	exit 1
}
in_ns() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}
# start_ns NS LOG CMD...: CMD in the background in NS. `ip netns exec`
# execs CMD (so does env), so $! is CMD's own PID — the process cleanup
# signals — not a subshell's (which a backgrounded function would be).
start_ns() {
	local ns=$1 log=$2
	shift 2
	ip netns exec "$ns" "$@" >"$log" 2>&1 &
	PIDS+=($!)
	echo $! >>"$DIR/pids"
}

# DEMO_INTERRUPT_AT: a Ctrl-C at this point. In its own process group (as
# DEMO_INTERRUPT_TEST runs it) the demo signals the whole group, as the
# terminal would; otherwise only itself.
interrupt_point() {
	[ "${DEMO_INTERRUPT_AT:-}" = "$1" ] || return 0
	printf "   -- DEMO_INTERRUPT_AT=%s: SIGINT\n" "$1"
	if [ "$(ps -o pgid= -p $$ | tr -d ' ')" = "$$" ]; then kill -INT -- -$$; else kill -INT $$; fi
	sleep 2
	fail "SIGINT did not stop the demo"
}
step() {
	interrupt_point "$1"
	say "$1. $2"
}

# The host's own network, as ip(8) shows it; lifetimes that count down are
# blanked so that only a change shows.
host_net() {
	{
		echo "# links"
		ip -o link show
		echo "# addresses"
		ip -o addr show
		echo "# rules"
		ip -4 rule show
		ip -6 rule show
		echo "# routes"
		ip -4 route show table all
		ip -6 route show table all
	} 2>&1 | sed -E 's/(valid_lft|preferred_lft|expires) [^ ]+/\1 _/g'
}
# The pod namespace's links, rules and routes: what the agent's capture
# changes and must restore. IPv6 link-local routes come and go with DAD.
pod_net() {
	{
		ip -n $POD -o link show | awk -F': ' '{print $2}'
		ip -n $POD -4 rule show
		ip -n $POD -6 rule show
		ip -n $POD -4 route show table all
		ip -n $POD -6 route show table all | sed '/fe80::/d'
		# the sysctls capture sets on the pod's side (tun/capture_linux.go sysctls)
		ip netns exec $POD sh -c 'for k in ipv4/conf/all/rp_filter ipv4/conf/eth0/forwarding \
			ipv6/conf/all/forwarding ipv6/conf/eth0/forwarding ipv6/conf/eth0/accept_ra; do
			echo "$k=$(cat /proc/sys/net/$k)"; done'
	} 2>&1
}
mtd_links() { ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep '^mtd-' || true; }
mtd_netns() { ip netns list | awk '{print $1}' | grep '^mtd-' || true; }
# del_mtd_links removes mtd-* links an older demo left on the host (it
# created its veths there, then moved them); deleting one end of a pair
# removes its peer, so a missing link is not an error.
del_mtd_links() { for l in $(mtd_links); do ip link del "$l" 2>/dev/null || true; done; }

# stop_processes: SIGTERM to every process the demo started, then up to 15
# s (the agent drains for terminationDrainDuration, 5 s, before it removes
# its capture), then SIGKILL. Sets STOP_RC[pid] to each exit status.
declare -A STOP_RC=()
stop_processes() {
	local pid
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	local deadline=$((SECONDS + 15))
	for pid in "${PIDS[@]}"; do
		while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			printf "   ${R}FAIL${N} pid %s (%s) did not exit after SIGTERM: SIGKILL\n" "$pid" "$(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-60)"
			kill -KILL "$pid" 2>/dev/null
			STOP_FAILED=1
		fi
		wait "$pid" 2>/dev/null
		STOP_RC[$pid]=$?
	done
}

cleanup() {
	local rc=$?
	# A second Ctrl-C (or the interrupt test's timeout) must not cut the
	# clean-up short and leave namespaces and processes behind.
	trap - EXIT
	trap '' INT TERM
	set +e
	local bad=0
	STOP_FAILED=0
	say "cleaning up"
	stop_processes
	[ "$STOP_FAILED" -eq 0 ] || bad=1
	if [ -n "$AGENT_PID" ]; then
		if [ "$rc" -eq 0 ] && [ "${STOP_RC[$AGENT_PID]}" -ne 0 ]; then
			printf "   ${R}FAIL${N} meshtun agent exited %s after SIGTERM, want 0\n" "${STOP_RC[$AGENT_PID]}"
			bad=1
		fi
		if [ -n "$POD_BEFORE" ] && [ -e "/run/netns/$POD" ]; then
			if diff <(echo "$POD_BEFORE") <(pod_net) >"$DIR/pod-net.diff"; then
				ok "agent stopped (exit ${STOP_RC[$AGENT_PID]}); its capture is removed: $POD's links, rules, routes and sysctls as before"
			else
				printf "   ${R}FAIL${N} the agent left capture behind in %s:\n" "$POD"
				sed 's/^/        /' "$DIR/pod-net.diff"
				bad=1
			fi
		fi
	fi
	local ns pid
	for ns in $POD $SVC $EXT $PODA $PODB; do
		if [ -e "/run/netns/$ns" ]; then
			for pid in $(ip netns pids "$ns" 2>/dev/null); do
				printf "   ${R}FAIL${N} pid %s still in %s: SIGKILL\n" "$pid" "$ns"
				kill -KILL "$pid" 2>/dev/null
				bad=1
			done
			ip netns del "$ns"
		fi
	done
	del_mtd_links
	[ -z "$(mtd_netns)" ] || { printf "   ${R}FAIL${N} namespaces left: %s\n" "$(mtd_netns | tr '\n' ' ')"; bad=1; }
	if [ -n "$HOST_BEFORE" ]; then
		if diff <(echo "$HOST_BEFORE") <(host_net) >"$DIR/host-net.diff"; then
			ok "the host's network is unchanged (links, addresses, rules, routes; IPv4 and IPv6); no mtd-* namespace left"
		else
			printf "   ${R}FAIL${N} the host's network changed:\n"
			sed 's/^/        /' "$DIR/host-net.diff"
			bad=1
		fi
	fi
	if [ "$bad" -ne 0 ] && { [ "$rc" -eq 0 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; }; then rc=1; fi
	if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
		[ -n "${DEMO_DIR:-}" ] || echo "logs kept in $DIR"
		if [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
			for f in "$DIR"/*.log; do
				[ -e "$f" ] || continue
				echo "--- $f (last 15 lines)"
				tail -n 15 "$f"
			done
		fi
	else
		rm -rf "$DIR"
		ok "namespaces and processes removed"
	fi
	exit "$rc"
}

[ "$(id -u)" -eq 0 ] || fail "make demo needs root (network namespaces, TUN)"
for c in ip curl ps setsid timeout; do command -v $c >/dev/null || fail "$c not found (bash scripts/install-deps.sh)"; done
[ -x "$BIN" ] && [ -x "$DEMOSERVER" ] || fail "build first: make build (and go build -o $DEMOSERVER ./cmd/demoserver)"
BIN=$(realpath "$BIN")
DEMOSERVER=$(realpath "$DEMOSERVER")

# DEMO_INTERRUPT_TEST: the demo, Ctrl-C'd at each point, in a session of its
# own (so the SIGINT reaches its processes, not make), must exit 130 and
# leave no process, namespace, link, rule or route behind.
if [ -n "${DEMO_INTERRUPT_TEST:-}" ]; then
	for point in $DEMO_INTERRUPT_TEST; do
		say "interrupt test: Ctrl-C at $point"
		del_mtd_links
		before=$(host_net)
		dir=$(mktemp -d /tmp/meshtun-demo.XXXXXX)
		rc=0
		# Output to a file, not a pipe: a Ctrl-C of this loop must not
		# leave the inner run writing into a dead pipe (SIGPIPE, no clean-up).
		DEMO_DIR=$dir DEMO_INTERRUPT_AT=$point DEMO_INTERRUPT_TEST='' MESHTUN_BIN=$BIN DEMOSERVER_BIN=$DEMOSERVER \
			timeout -k 5 120 setsid -w bash "$SELF" >"$dir/out" 2>&1 || rc=$?
		sed 's/^/   | /' "$dir/out"
		if [ "$rc" -ne 130 ]; then
			[ "$rc" -ne 124 ] || echo "   the interrupted demo timed out after 120 s"
			for pid in $(cat "$dir/pids" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
			for ns in $(mtd_netns); do ip netns del "$ns" || true; done
			fail "interrupted at $point: exit $rc, want 130 (logs in $dir; its processes and namespaces were removed)"
		fi
		touch "$dir/pids"
		for pid in $(cat "$dir/pids"); do
			if kill -0 "$pid" 2>/dev/null; then fail "interrupted at $point: pid $pid still running"; fi
		done
		[ -z "$(mtd_netns)" ] || fail "interrupted at $point: namespaces left: $(mtd_netns | tr '\n' ' ')"
		[ -z "$(mtd_links)" ] || fail "interrupted at $point: links left on the host: $(mtd_links | tr '\n' ' ')"
		diff <(echo "$before") <(host_net) || fail "interrupted at $point: the host's network changed"
		n=$(wc -w <"$dir/pids")
		rm -rf "$dir"
		ok "interrupted at $point: exit 130; its $n processes stopped, namespaces removed, the host's network unchanged"
	done
	say "interrupt tests passed"
	exit 0
fi

if [ -n "${DEMO_DIR:-}" ]; then DIR=$DEMO_DIR; else DIR=$(mktemp -d /tmp/meshtun-demo.XXXXXX); fi
: >"$DIR/pids"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

del_mtd_links # before the host's network is recorded
HOST_BEFORE=$(host_net)

step 1 "namespaces: $POD (the pod), $SVC (services + control plane), $EXT (outside)"
for ns in $POD $SVC $EXT; do
	if [ -e "/run/netns/$ns" ]; then ip netns del "$ns"; fi
	ip netns add $ns
	ip -n $ns link set lo up
done
# Each veth pair is created with its ends already in their namespaces: the
# host's namespace never holds one, even for an instant.
ip -n $POD link add eth0 type veth peer name mtd-ps netns $SVC
interrupt_point 1.veth
ip -n $POD addr add 10.78.0.2/24 dev eth0
ip -n $POD link set eth0 up
ip -n $POD route add default via 10.78.0.1
ip -n $SVC addr add 10.78.0.1/24 dev mtd-ps
ip -n $SVC link set mtd-ps up
ip -n $SVC addr add 10.78.1.10/32 dev lo
ip -n $SVC addr add 10.78.1.11/32 dev lo
ip -n $EXT link add eth0 type veth peer name mtd-es netns $SVC
ip -n $EXT addr add $EXT_IP/24 dev eth0
ip -n $EXT link set eth0 up
ip -n $EXT route add default via 10.78.2.1
ip -n $SVC addr add 10.78.2.1/24 dev mtd-es
ip -n $SVC link set mtd-es up
in_ns $SVC sysctl -qw net.ipv4.ip_forward=1
POD_BEFORE=$(pod_net)
ok "pod 10.78.0.2 → services 10.78.0.1, endpoints 10.78.1.10-11, external $EXT_IP"

step 2 "sample servers"
start_ns $SVC "$DIR/reviews-v1.log" "$DEMOSERVER" --name reviews-v1 --listen 10.78.1.10:9080
start_ns $SVC "$DIR/reviews-v2.log" "$DEMOSERVER" --name reviews-v2 --listen 10.78.1.11:9080
start_ns $EXT "$DIR/external.log" "$DEMOSERVER" --name external --listen $EXT_IP:80
ok "reviews-v1, reviews-v2 (service reviews.default, VIP $VIP:9080) and external ($EXT_IP:80)"

step 3 "meshtun controlplane (registry: reviews; profile: default = ALLOW_ANY)"
cat >"$DIR/registry.yaml" <<YAML
apiVersion: meshtun.io/v1alpha1
kind: Registry
services:
- name: reviews
  namespace: default
  vip: $VIP
  ports:
  - {name: http, port: 9080, protocol: HTTP}
  endpoints:
  - {address: 10.78.1.10, labels: {version: v1}}
  - {address: 10.78.1.11, labels: {version: v2}}
YAML
mkdir -p "$DIR/cp"
start_ns $SVC "$DIR/controlplane.log" "$BIN" controlplane --registry "$DIR/registry.yaml" --xds-address 10.78.0.1:15010 \
	--api-address 127.0.0.1:15014 --state-dir "$DIR/cp" --log-format json
for _ in $(seq 100); do [ -s "$DIR/cp/controlplane.token" ] && break; sleep 0.1; done
[ -s "$DIR/cp/controlplane.token" ] || fail "the control plane did not start (see $DIR/controlplane.log)"
ok "ADS on 10.78.0.1:15010, profile API on 127.0.0.1:15014 (token $DIR/cp/controlplane.token)"

step 4 "meshtun agent in the pod (bootstrap from the injector's environment, capture, proxy)"
start_ns $POD "$DIR/agent.log" env -i PATH="$PATH" POD_NAME=productpage POD_NAMESPACE=default INSTANCE_IP=10.78.0.2 SERVICE_ACCOUNT=productpage \
	"$BIN" agent --discovery-address 10.78.0.1:15010 --state-dir "$DIR/state" --bootstrap-out "$DIR/envoy-rev.json" \
	--pod-labels-file "" --pod-annotations-file "" --log-format json
AGENT_PID=$!
interrupt_point 4.agent
in_ns $POD "$BIN" agent wait --timeout 30s >"$DIR/wait.log" 2>&1 || fail "the proxy never became ready (see $DIR/agent.log)"
ok "ready: /healthz/ready answers 200 (meshtun agent wait)"

curl_pod() { in_ns $POD curl -s --max-time 3 "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

step 5 "a registered service: 8 requests to http://$VIP:9080/ are load-balanced over its endpoints"
declare -A seen=()
for i in $(seq 8); do
	rc=0
	body=$(curl_pod "http://$VIP:9080/") || rc=$?
	[ "$rc" -eq 0 ] || fail "request $i to the VIP failed (curl exit $rc); the proxy's log is in $DIR/agent.log"
	echo "   $i: $body"
	seen[$body]=1
done
[ -n "${seen[reviews-v1]:-}" ] && [ -n "${seen[reviews-v2]:-}" ] || fail "not spread over both endpoints: ${!seen[*]}"
ok "both reviews-v1 and reviews-v2 answered"

step 6 "an unregistered external address passes through (ALLOW_ANY)"
body=$(curl_pod "http://$EXT_IP/") || fail "the external request failed under ALLOW_ANY"
[ "$body" = external ] || fail "the external server should answer \"external\", got: $body"
ok "http://$EXT_IP/ → $body"

step 7 "meshtun profile apply -f examples/profile-registry-only.yaml"
in_ns $SVC "$BIN" profile apply -f examples/profile-registry-only.yaml --controlplane 127.0.0.1:15014 \
	--token-file "$DIR/cp/controlplane.token" || fail "profile apply failed (see $DIR/controlplane.log)"
applied=$(now_ms)
ok "REGISTRY_ONLY applied"

step 8 "the same external request is now refused"
# Refused means the connection is refused (curl exit 7: the proxy answers
# the SYN with a reset), not a timeout or a reset mid-request, and within
# 1 s of the apply.
# Other outcomes (a success before the push lands, a reset while the
# configuration swaps) are retried until the deadline.
rc=0 ms=0
while :; do
	rc=0
	curl_pod --max-time 1 -o /dev/null "http://$EXT_IP/" || rc=$?
	ms=$(($(now_ms) - applied))
	[ "$rc" -ne 7 ] && [ "$ms" -le 1000 ] || break
	sleep 0.02
done
[ "$rc" -eq 7 ] || fail "not refused ${ms} ms after REGISTRY_ONLY was applied (last curl exit $rc, want 7: connection refused); see $DIR/agent.log"
ok "refused ${ms} ms after the apply (curl exit 7: connection refused)"
rc=0
curl_pod -o /dev/null "http://$EXT_IP/" || rc=$?
[ "$rc" -eq 7 ] || fail "the refusal did not last: curl exit $rc, want 7"
body=$(curl_pod "http://$VIP:9080/") || fail "the registered service no longer answers under REGISTRY_ONLY"
case $body in reviews-v1 | reviews-v2) ;; *) fail "unexpected answer from the registered service: $body" ;; esac
ok "still refused (exit 7); the registered service still answers: $body"

step 9 "meshtun request GET /listeners and /clusters (pilot-agent request)"
listeners=$(in_ns $POD "$BIN" request GET /listeners) || fail "meshtun request GET /listeners failed (see $DIR/agent.log)"
echo "$listeners" | sed 's/^/   /'
grep -q '^virtualOutbound::0.0.0.0:15001$' <<<"$listeners" || fail "no virtualOutbound in /listeners"
clusters=$(in_ns $POD "$BIN" request GET /clusters) || fail "meshtun request GET /clusters failed (see $DIR/agent.log)"
grep -E '::(cx_total|health_flags)::' <<<"$clusters" | grep 'reviews' | sed 's/^/   /'
grep -q '^outbound|9080||reviews.default.svc.cluster.local::10.78.1.10:9080::cx_total::' <<<"$clusters" ||
	fail "no per-host lines for reviews in /clusters"
ok "Envoy's formats, from the running proxy"

step 10 "back to ALLOW_ANY"
in_ns $SVC "$BIN" profile apply -f examples/profile-default.yaml --controlplane 127.0.0.1:15014 \
	--token-file "$DIR/cp/controlplane.token" || fail "profile apply failed (see $DIR/controlplane.log)"
applied=$(now_ms)
while [ $(($(now_ms) - applied)) -le 3000 ]; do
	curl_pod --max-time 1 -o /dev/null "http://$EXT_IP/" && break
	sleep 0.02
done
body=$(curl_pod "http://$EXT_IP/") || fail "external request still refused after ALLOW_ANY"
[ "$body" = external ] || fail "the external server should answer \"external\", got: $body"
ok "http://$EXT_IP/ → $body"

# mtls_steps: issue 14's mutual TLS in the demo. Two more pods, each with a
# meshtun agent whose identity comes from the control plane's CA on :15012
# (a token per service account, as Kubernetes projects one), and ADS over
# the same TLS port, so the control plane gives them Istio's TLS shapes:
# endpoints of hello carry tlsMode istio, hello's cluster the
# transport_socket_matches, virtualInbound the PERMISSIVE chains.
mtls_steps() {
	step 11 "two meshed pods: $PODA (client, account client) and $PODB (server-b, account server), identities from the control plane's CA"
	local ns n
	for ns in $PODA $PODB; do
		if [ -e "/run/netns/$ns" ]; then ip netns del "$ns"; fi
		ip netns add $ns
		ip -n $ns link set lo up
	done
	ip -n $PODA link add eth0 type veth peer name mtd-as netns $SVC
	ip -n $PODB link add eth0 type veth peer name mtd-bs netns $SVC
	for n in 3 4; do
		ns=$PODA
		[ $n -eq 4 ] && ns=$PODB
		ip -n $ns addr add 10.78.$n.2/24 dev eth0
		ip -n $ns link set eth0 up
		ip -n $ns route add default via 10.78.$n.1
	done
	ip -n $SVC addr add 10.78.3.1/24 dev mtd-as
	ip -n $SVC link set mtd-as up
	ip -n $SVC addr add 10.78.4.1/24 dev mtd-bs
	ip -n $SVC link set mtd-bs up
	start_ns $PODB "$DIR/server-b.log" "$DEMOSERVER" --name server-b --listen 10.78.4.2:8080
	# hello's endpoint is a workload with a sidecar (Istio's injected pod,
	# security.istio.io/tlsMode=istio) and the service account server.
	cat >>"$DIR/registry.yaml" <<YAML
- name: hello
  namespace: default
  vip: $HELLO_VIP
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  endpoints:
  - {address: 10.78.4.2, name: server-b, sidecar: true, serviceAccount: server}
YAML
	local pod ip sa
	for pod in a b; do
		ns=$PODA ip=10.78.3 sa=client
		[ $pod = b ] && ns=$PODB ip=10.78.4 sa=server
		mkdir -p "$DIR/$pod"
		"$BIN" controlplane token --namespace default --service-account $sa --state-dir "$DIR/cp" >"$DIR/$pod/istio-token" ||
			fail "meshtun controlplane token failed"
		start_ns $ns "$DIR/agent-$pod.log" env -i PATH="$PATH" POD_NAME=$sa-$pod POD_NAMESPACE=default INSTANCE_IP=$ip.2 \
			SERVICE_ACCOUNT=$sa ISTIOD_SAN=istiod.istio-system.svc \
			"$BIN" agent --discovery-address $ip.1:15012 --ca-root-file "$DIR/cp/ca/root-cert.pem" --token-file "$DIR/$pod/istio-token" \
			--sds-socket "$DIR/$pod/sds.sock" --state-dir "$DIR/$pod/state" --bootstrap-out "$DIR/$pod/envoy-rev.json" \
			--pod-labels-file "" --pod-annotations-file "" --log-format json
	done
	for ns in $PODA $PODB; do
		in_ns $ns "$BIN" agent wait --timeout 30s >>"$DIR/wait.log" 2>&1 || fail "the proxy in $ns never became ready (see $DIR/agent-*.log)"
	done
	ok "both ready: each agent got a certificate from the CA and its configuration over ADS on :15012"

	step 12 "workload identity: each proxy's certificate (meshtun request GET /certs)"
	local certs id leaf
	for pod in a b; do
		ns=$PODA sa=client
		[ $pod = b ] && ns=$PODB sa=server
		certs=$(in_ns $ns "$BIN" request GET /certs) || fail "meshtun request GET /certs failed in $ns"
		id=spiffe://cluster.local/ns/default/sa/$sa
		grep -q "\"$id\"" <<<"$certs" || fail "$ns: /certs does not show $id:
$certs"
		# The leaf is under cert_chain (ca_cert, the root, comes first).
		leaf=$(sed -n '/"cert_chain"/,$p' <<<"$certs")
		printf "   %s: %s, serial %s, expires %s\n" "$ns" "$id" "$(grep -o '"serial_number": *"[0-9a-f]*"' <<<"$leaf" | head -1 | grep -o '[0-9a-f]*"$' | tr -d '"')" \
			"$(grep -o '"expiration_time": *"[^"]*"' <<<"$leaf" | head -1 | cut -d'"' -f4)"
	done
	ok "each proxy holds its own SPIFFE identity (the CA's root in ROOTCA)"

	step 13 "$PODA → http://$HELLO_VIP/ (service hello, endpoint tlsMode istio) over mutual TLS"
	in_ns $SVC "$BIN" profile apply -f examples/profile-demo.yaml --controlplane 127.0.0.1:15014 \
		--token-file "$DIR/cp/controlplane.token" >/dev/null || fail "profile apply failed (see $DIR/controlplane.log)"
	local body="" deadline=$((SECONDS + 15))
	while [ $SECONDS -lt $deadline ]; do
		body=$(in_ns $PODA curl -s --max-time 2 "http://$HELLO_VIP/") && [ "$body" = server-b ] && break
		sleep 0.2
	done
	[ "$body" = server-b ] || fail "$PODA → hello: got \"$body\" (see $DIR/agent-a.log, $DIR/agent-b.log)"
	ok "http://$HELLO_VIP/ → $body"
	local xfcc
	xfcc=$(in_ns $PODA curl -s --max-time 2 "http://$HELLO_VIP/xfcc") || fail "$PODA → hello/xfcc failed"
	echo "   x-forwarded-client-cert at server-b: $xfcc"
	grep -q 'URI=spiffe://cluster.local/ns/default/sa/client' <<<"$xfcc" ||
		fail "server-b's application did not get the client's identity in x-forwarded-client-cert"
	local hs
	hs=$(in_ns $PODB "$BIN" request GET /stats | { grep -E '^listener\.[^ ]*15006\.ssl\.handshake: ' || true; } | awk '{s+=$2} END {print s+0}')
	[ "$hs" -gt 0 ] || fail "$PODB's virtualInbound counted no TLS handshake (listener.*15006.ssl.handshake)"
	in_ns $PODA "$BIN" request GET /stats | { grep -E "^cluster\.outbound\|80\|\|hello\.default\.svc\.cluster\.local\.ssl\.(handshake|versions)" || true; } | sed 's/^/   /'
	ok "mutual TLS between the pods: $hs handshake(s) on $PODB's inbound (ssl.handshake), $PODA's cluster above; the application got plaintext"
	local line=""
	deadline=$((SECONDS + 5))
	while [ $SECONDS -lt $deadline ]; do
		line=$(grep '"logger":"access"' "$DIR/agent-b.log" | grep '"downstream_peer_uri_san":"spiffe://cluster.local/ns/default/sa/client"' | tail -1) && break
		sleep 0.2
	done
	[ -n "$line" ] || fail "$PODB's access log does not name the client's SPIFFE ID (see $DIR/agent-b.log)"
	echo "   $(grep -o '"direction":"[^"]*"\|"upstream_cluster":"[^"]*"\|"response_code":[0-9]*\|"downstream_peer_uri_san":"[^"]*"' <<<"$line" | tr '\n' ' ')"
	ok "server-b's proxy logged the peer spiffe://cluster.local/ns/default/sa/client"

	step 14 "a plaintext client outside the mesh ($EXT) → http://10.78.4.2:8080/: accepted under PERMISSIVE"
	body=$(in_ns $EXT curl -s --max-time 3 "http://10.78.4.2:8080/") || fail "plaintext to $PODB refused under PERMISSIVE"
	[ "$body" = server-b ] || fail "plaintext to $PODB: got \"$body\""
	ok "http://10.78.4.2:8080/ → $body (plaintext chain)"

	step 15 "meshtun profile apply -f examples/profile-strict.yaml: the plaintext client is refused, $PODA still served"
	in_ns $SVC "$BIN" profile apply -f examples/profile-strict.yaml --controlplane 127.0.0.1:15014 \
		--token-file "$DIR/cp/controlplane.token" >/dev/null || fail "profile apply failed (see $DIR/controlplane.log)"
	local rc=0
	deadline=$((SECONDS + 5))
	while [ $SECONDS -lt $deadline ]; do
		rc=0
		body=$(in_ns $EXT curl -s --max-time 2 "http://10.78.4.2:8080/") || rc=$?
		[ "$rc" -ne 0 ] && break
		sleep 0.1
	done
	[ "$rc" -ne 0 ] && [ "$body" != server-b ] || fail "plaintext still served 5 s after STRICT: \"$body\""
	ok "plaintext refused (curl exit $rc)"
	body=$(in_ns $PODA curl -s --max-time 3 "http://$HELLO_VIP/") || fail "$PODA → hello failed under STRICT"
	[ "$body" = server-b ] || fail "$PODA → hello under STRICT: \"$body\""
	ok "$PODA → http://$HELLO_VIP/ → $body (mTLS)"

	step 16 "authorization: $PODA → http://$HELLO_VIP/private allowed, then an AuthorizationPolicy denies it, live"
	body=$(in_ns $PODA curl -s --max-time 3 -o /dev/null -w '%{http_code}' "http://$HELLO_VIP/private") || fail "$PODA → hello/private failed"
	[ "$body" = 200 ] || fail "$PODA → hello/private before the policy: $body"
	ok "GET /private → 200 (no policy)"
	# Istio's AuthorizationPolicy: DENY paths /private* to the workloads of
	# namespace default, from anyone; istiod's RBAC filters result.
	cat >>"$DIR/registry.yaml" <<YAML
authorizationPolicies:
- name: no-private
  namespace: default
  action: DENY
  rules:
  - to:
    - operation: {ports: ["8080"], paths: ["/private*"]}
YAML
	local code=""
	deadline=$((SECONDS + 10))
	while [ $SECONDS -lt $deadline ]; do
		code=$(in_ns $PODA curl -s --max-time 2 -o "$DIR/private.body" -w '%{http_code}' "http://$HELLO_VIP/private") && [ "$code" = 403 ] && break
		sleep 0.1
	done
	[ "$code" = 403 ] || fail "GET /private still $code 10 s after the policy (see $DIR/controlplane.log, $DIR/agent-b.log)"
	ok "GET /private → 403 \"$(cat "$DIR/private.body")\" from $PODB's proxy (envoy.filters.http.rbac)"
	body=$(in_ns $PODA curl -s --max-time 3 "http://$HELLO_VIP/") || fail "$PODA → hello failed under the policy"
	[ "$body" = server-b ] || fail "$PODA → hello under the policy: \"$body\""
	ok "GET / → $body (not covered by the policy)"
	in_ns $PODB "$BIN" request GET /stats | { grep -E '\.rbac\.(allowed|denied): ' || true; } | sed 's/^/   /'
}

if [ "$DEMO_MTLS" = 1 ]; then
	mtls_steps
fi

say "demo passed"
