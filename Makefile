# meshtun — see README.md.
GO        ?= go
BIN       := bin/meshtun
PKGS      := ./...
# Integration tests create network namespaces and TUN devices: root only.
INTEG_TIMEOUT ?= 20m

.PHONY: all build test unit integration bench demo lint clean deps image image-check k8s-check k8s-update
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
ARCHES    := amd64 arm64

all: build

# Static (CGO_ENABLED=0, the pure-Go resolver), as the image's binary: what make bench and the
# integration tests run is what ships, and the proxy maps no libc and ld.so (~1.5 MB of idle RSS).
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/meshtun

deps:
	bash scripts/install-deps.sh

# Every test: lint, unit tests (with the race detector), then the integration
# tests in network namespaces against the built binary.
test: lint unit integration demo image-check k8s-check

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration)
	# Allocation counts that -race perturbs (sync.Pool drops under it).
	$(GO) test -count=1 -run 'TestFiftyPolicies' ./mesh/rbac

integration: build
	MESHTUN_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout $(INTEG_TIMEOUT) -v ./integration/...

bench: build deps
	# Direct, REDIRECT and meshtun (capture, vip/HCM): throughput, RR, connect, HTTP; then the proxy
	# process's vCPU and RSS per 1,000 HTTP req/s (BENCH_LOAD_SECONDS, 30 s) and idle RSS, against Istio's figures.
	bash scripts/bench.sh
	# xDS scale: 10,000 services pushed to a live proxy (time to ACK, RSS).
	MESHTUN_SCALE=10000 MESHTUN_BIN=$(CURDIR)/$(BIN) $(GO) test -tags scale -count=1 -run TestXDSScale -v ./integration/ | grep -E 'services:|--- '
	# Workload identity: agent start to ready with the CA (15012, token), median of 5 per key type.
	MESHTUN_BIN=$(CURDIR)/$(BIN) $(GO) test -tags bench -count=1 -run TestAgentReadyWithCABench -v ./integration/ | grep -E 'start to ready|--- '
	# mTLS between two meshed pods vs plaintext: 1-stream throughput, 64 B RR p50/p99, connections/s (ECDSA), with and without session resumption.
	MESHTUN_BIN=$(CURDIR)/$(BIN) $(GO) test -tags bench -count=1 -timeout 20m -run TestMTLSBench -v ./integration/ | grep -E '^ *mTLS|--- '
	# HTTP memory: 10,000 idle keep-alive h1 connections, one h2c connection with 1,000 open streams.
	$(GO) test -tags bench -count=1 -run TestMemory -v ./mesh/httpconn/ | grep -E 'connections:|streams:|--- '

# The README's first command: meshtun end to end in throwaway namespaces
# (control plane, agent + proxy, sample servers), each step asserted; then
# Ctrl-C'd at several points (mid-setup, agent starting, agent serving, a
# profile just applied), each asserted to leave nothing behind.
DEMO_INTERRUPT_POINTS ?= 1.veth 4.agent 5 8
# DEMO_MTLS=1 adds the mutual TLS steps (two meshed pods, PERMISSIVE then STRICT).
DEMO_MTLS ?= 1
demo: build
	$(GO) build -o bin/demoserver ./cmd/demoserver
	MESHTUN_BIN=$(BIN) DEMOSERVER_BIN=bin/demoserver DEMO_MTLS=$(DEMO_MTLS) bash scripts/demo.sh
	MESHTUN_BIN=$(BIN) DEMOSERVER_BIN=bin/demoserver DEMO_INTERRUPT_TEST="$(DEMO_INTERRUPT_POINTS)" bash scripts/demo.sh

# The container image, with no daemon and no registry (tools/image, its own
# module): static binaries per architecture, then a docker-save tarball each
# and one OCI layout with the multi-arch index, in dist/. Reproducible:
# the same tree and Go give the same digests (SOURCE_DATE_EPOCH, default 0).
image:
	@for arch in $(ARCHES); do \
		echo "building dist/linux-$$arch/meshtun"; \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath -buildvcs=false \
			-ldflags "-s -w -buildid= -X main.version=$(VERSION)" -o dist/linux-$$arch/meshtun ./cmd/meshtun || exit 1; \
	done
	cd tools/image && $(GO) run . -version $(VERSION) -out ../../dist $(foreach a,$(ARCHES),linux/$(a)=../../dist/linux-$(a)/meshtun)

# The image tool's tests: the same binary gives the same digest, the image
# and its tarball pass go-containerregistry's validation, and its root
# filesystem runs `meshtun version` and `pilot-agent version` as uid 1337.
image-check:
	cd tools/image && $(GO) vet ./ && $(GO) test -count=1 -timeout 30m ./

# Kubernetes packaging, with no cluster and no daemon (tools/k8scheck, its own module, so Istio, Helm
# and the Kubernetes libraries stay out of the proxy's dependencies): after the image checks, Istio's
# istiod chart renders the injector files from deploy/istio's values file, Istio's injector
# (pkg/kube/inject, istioctl kube-inject's code) renders a sample Deployment for {classic, native} x
# {plain, holdApplicationUntilProxyStarts, interception NONE} against goldens, each pod is strictly
# decoded into k8s.io/api types, defaulted, checked and judged by Pod Security Admission (verdicts
# printed), and deploy/charts/meshtun goes through helm lint --strict and helm template.
k8s-check: image-check
	cd tools/k8scheck && $(GO) vet ./ && $(GO) test -count=1 -v -timeout 30m ./

# Regenerate what k8s-check compares (deploy/istio's offline injector files, the chart's copies, the
# goldens) after a change of the template or of the pinned Istio; review the diff.
k8s-update:
	cd tools/k8scheck && $(GO) test -count=1 -update ./

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	# Laptop mode ships for macOS too: the tree must cross-compile.
	GOOS=darwin GOARCH=arm64 $(GO) build ./...
	GOOS=darwin GOARCH=amd64 $(GO) vet ./tun/ ./mesh/upstream/ ./agent/ ./cmd/...

clean:
	rm -rf bin dist
