#!/usr/bin/env bash
# Installs what meshtun's tests and benchmarks need on a fresh Debian machine:
# iproute2 (ip netns, veth), iperf3 and iptables (throughput bench and its REDIRECT reference), curl, procps (sysctl,
# ps), util-linux (setsid) and coreutils (timeout) for make demo, openssl.
# Idempotent: does nothing when everything is already present.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
command -v ps >/dev/null 2>&1 || need+=(procps)
command -v setsid >/dev/null 2>&1 || need+=(util-linux)
command -v timeout >/dev/null 2>&1 || need+=(coreutils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: need root to install: ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-deps: installed ${need[*]}"
