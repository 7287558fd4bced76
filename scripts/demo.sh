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
#
# Needs root, iproute2 and curl (scripts/install-deps.sh). Everything it
# started and created is removed on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${MESHTUN_BIN:-bin/meshtun}
DEMOSERVER=${DEMOSERVER_BIN:-bin/demoserver}
POD=mtd-pod SVC=mtd-svc EXT=mtd-ext
VIP=10.96.0.20
EXT_IP=10.78.2.10
DIR=$(mktemp -d /tmp/meshtun-demo.XXXXXX)
PIDS=()
FAILED=0

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

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	say "cleaning up"
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	for pid in "${PIDS[@]}"; do
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	for ns in $POD $SVC $EXT; do
		if [ -e "/run/netns/$ns" ]; then
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
			ip netns del "$ns"
		fi
	done
	if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
		echo "logs kept in $DIR"
		for f in "$DIR"/*.log; do
			[ -e "$f" ] || continue
			echo "--- $f (last 15 lines)"
			tail -n 15 "$f"
		done
	else
		rm -rf "$DIR"
		ok "namespaces and processes removed"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || fail "make demo needs root (network namespaces, TUN)"
for c in ip curl; do command -v $c >/dev/null || fail "$c not found (bash scripts/install-deps.sh)"; done
[ -x "$BIN" ] && [ -x "$DEMOSERVER" ] || fail "build first: make build (and go build -o $DEMOSERVER ./cmd/demoserver)"
BIN=$(realpath "$BIN")
DEMOSERVER=$(realpath "$DEMOSERVER")

say "1. namespaces: $POD (the pod), $SVC (services + control plane), $EXT (outside)"
for ns in $POD $SVC $EXT; do
	if [ -e "/run/netns/$ns" ]; then ip netns del "$ns"; fi
	ip netns add $ns
	ip -n $ns link set lo up
done
ip link add mtd-p type veth peer name mtd-ps
ip link set mtd-p netns $POD
ip link set mtd-ps netns $SVC
ip -n $POD link set mtd-p name eth0
ip -n $POD addr add 10.78.0.2/24 dev eth0
ip -n $POD link set eth0 up
ip -n $POD route add default via 10.78.0.1
ip -n $SVC addr add 10.78.0.1/24 dev mtd-ps
ip -n $SVC link set mtd-ps up
ip -n $SVC addr add 10.78.1.10/32 dev lo
ip -n $SVC addr add 10.78.1.11/32 dev lo
ip link add mtd-e type veth peer name mtd-es
ip link set mtd-e netns $EXT
ip link set mtd-es netns $SVC
ip -n $EXT link set mtd-e name eth0
ip -n $EXT addr add $EXT_IP/24 dev eth0
ip -n $EXT link set eth0 up
ip -n $EXT route add default via 10.78.2.1
ip -n $SVC addr add 10.78.2.1/24 dev mtd-es
ip -n $SVC link set mtd-es up
in_ns $SVC sysctl -qw net.ipv4.ip_forward=1
ok "pod 10.78.0.2 → services 10.78.0.1, endpoints 10.78.1.10-11, external $EXT_IP"

say "2. sample servers"
in_ns $SVC "$DEMOSERVER" --name reviews-v1 --listen 10.78.1.10:9080 >"$DIR/reviews-v1.log" 2>&1 &
PIDS+=($!)
in_ns $SVC "$DEMOSERVER" --name reviews-v2 --listen 10.78.1.11:9080 >"$DIR/reviews-v2.log" 2>&1 &
PIDS+=($!)
in_ns $EXT "$DEMOSERVER" --name external --listen $EXT_IP:80 >"$DIR/external.log" 2>&1 &
PIDS+=($!)
ok "reviews-v1, reviews-v2 (service reviews.default, VIP $VIP:9080) and external ($EXT_IP:80)"

say "3. meshtun controlplane (registry: reviews; profile: default = ALLOW_ANY)"
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
in_ns $SVC "$BIN" controlplane --registry "$DIR/registry.yaml" --xds-address 10.78.0.1:15010 \
	--api-address 127.0.0.1:15014 --state-dir "$DIR/cp" --log-format json >"$DIR/controlplane.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$DIR/cp/controlplane.token" ] && break; sleep 0.1; done
[ -s "$DIR/cp/controlplane.token" ] || fail "the control plane did not start (see $DIR/controlplane.log)"
ok "ADS on 10.78.0.1:15010, profile API on 127.0.0.1:15014 (token $DIR/cp/controlplane.token)"

say "4. meshtun agent in the pod (bootstrap from the injector's environment, capture, proxy)"
in_ns $POD env -i PATH="$PATH" POD_NAME=productpage POD_NAMESPACE=default INSTANCE_IP=10.78.0.2 SERVICE_ACCOUNT=productpage \
	"$BIN" agent --discovery-address 10.78.0.1:15010 --state-dir "$DIR/state" --bootstrap-out "$DIR/envoy-rev.json" \
	--pod-labels-file "" --pod-annotations-file "" --log-format json >"$DIR/agent.log" 2>&1 &
PIDS+=($!)
in_ns $POD "$BIN" agent wait --timeout 30s >"$DIR/wait.log" 2>&1 || fail "the proxy never became ready (see $DIR/agent.log)"
ok "ready: /healthz/ready answers 200 (meshtun agent wait)"

curl_pod() { in_ns $POD curl -s --max-time 3 "$@"; }

say "5. a registered service: 8 requests to http://$VIP:9080/ are load-balanced over its endpoints"
declare -A seen=()
for i in $(seq 8); do
	body=$(curl_pod "http://$VIP:9080/") || fail "request $i to the VIP failed"
	echo "   $i: $body"
	seen[$body]=1
done
[ -n "${seen[reviews-v1]:-}" ] && [ -n "${seen[reviews-v2]:-}" ] || fail "not spread over both endpoints: ${!seen[*]}"
ok "both reviews-v1 and reviews-v2 answered"

say "6. an unregistered external address passes through (ALLOW_ANY)"
body=$(curl_pod "http://$EXT_IP/") || fail "the external request failed under ALLOW_ANY"
[ "$body" = external ] || fail "unexpected answer: $body"
ok "http://$EXT_IP/ → $body"

say "7. meshtun profile apply -f examples/profile-registry-only.yaml"
in_ns $SVC "$BIN" profile apply -f examples/profile-registry-only.yaml --controlplane 127.0.0.1:15014 \
	--token-file "$DIR/cp/controlplane.token" || fail "profile apply failed"
applied=$(date +%s%N)
ok "REGISTRY_ONLY applied"

say "8. the same external request is now refused"
refused=0
for _ in $(seq 50); do
	if ! curl_pod -o /dev/null "http://$EXT_IP/"; then
		refused=1
		break
	fi
	sleep 0.05
done
[ "$refused" = 1 ] || fail "the external request still succeeds under REGISTRY_ONLY"
ms=$((($(date +%s%N) - applied) / 1000000))
rc=0
curl_pod -o /dev/null "http://$EXT_IP/" || rc=$?
[ "$rc" -ne 0 ] || fail "refusal did not last"
ok "refused ${ms} ms after the apply (curl exit $rc); the registered service still answers: $(curl_pod "http://$VIP:9080/")"

say "9. meshtun request GET /listeners and /clusters (pilot-agent request)"
listeners=$(in_ns $POD "$BIN" request GET /listeners) || fail "request GET /listeners"
echo "$listeners" | sed 's/^/   /'
grep -q '^virtualOutbound::0.0.0.0:15001$' <<<"$listeners" || fail "no virtualOutbound in /listeners"
clusters=$(in_ns $POD "$BIN" request GET /clusters) || fail "request GET /clusters"
grep -E '::(cx_total|health_flags)::' <<<"$clusters" | grep 'reviews' | sed 's/^/   /'
grep -q '^outbound|9080||reviews.default.svc.cluster.local::10.78.1.10:9080::cx_total::' <<<"$clusters" ||
	fail "no per-host lines for reviews in /clusters"
ok "Envoy's formats, from the running proxy"

say "10. back to ALLOW_ANY"
in_ns $SVC "$BIN" profile apply -f examples/profile-default.yaml --controlplane 127.0.0.1:15014 \
	--token-file "$DIR/cp/controlplane.token" || fail "profile apply failed"
for _ in $(seq 50); do curl_pod -o /dev/null "http://$EXT_IP/" && break; sleep 0.05; done
body=$(curl_pod "http://$EXT_IP/") || fail "external request still refused after ALLOW_ANY"
ok "http://$EXT_IP/ → $body"

say "demo passed"
