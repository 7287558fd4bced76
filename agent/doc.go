// Package agent is meshtun's pilot-agent: the process a pod's sidecar
// container runs, which owns everything about the proxy except the data
// path.
//
// It turns the environment the Istio sidecar injector sets (POD_NAME,
// INSTANCE_IP, PROXY_CONFIG, ISTIO_META_*, the downward-API files) into an
// Envoy bootstrap istiod recognizes, installs capture, and runs `meshtun
// proxy` as a child it restarts when it dies.
//
// The agent, not the proxy, owns the TUN device and capture. A proxy that
// crashes therefore leaves the routes in place; while none runs the agent
// switches capture to "unreachable" (tun.Capture.Block), so the pod's
// connections fail at once instead of hanging on a TUN nobody reads, and
// nothing leaks out uncaptured. Each new proxy inherits the same device.
//
// It also answers for the proxy to Kubernetes: readiness on :15021 (the
// proxy is live and has its first xDS configuration, as pilot-agent
// checks it), merged Prometheus metrics on :15020, `meshtun agent wait`
// for holdApplicationUntilProxyStarts, and graceful termination (the
// proxy drains active flows for terminationDrainDuration).
//
// It gives the pod its workload identity (identity.go): the CA client
// (agent/caclient) or the mounted /etc/certs feed the SDS server
// (agent/sds) on Istio's socket, and readiness waits for the certificate.
// With the discovery address on istiod's TLS port the proxy's xDS
// connection carries TLS and the bearer token (bootstrap.go,
// secureXDSCluster).
package agent
