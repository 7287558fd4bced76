// Package mesh turns captured flows into Envoy semantics: it is the
// listener manager, connection handler and cluster manager of an Envoy
// sidecar, configured by the same Listener, Cluster, RouteConfiguration
// and ClusterLoadAssignment resources istiod sends.
//
// # Flow of a connection
//
// The functions are spread over this package and its subpackages in the
// order a captured connection meets them:
//
//  1. Capture. The TUN device feeds a gVisor netstack, which terminates
//     every flow and calls netstack.Handler with its original addresses
//     (package netstack).
//  2. Gate (gate.go). Stops new flows once draining closed it (all, or the
//     inbound ones) and counts flows in progress for the exit; otherwise
//     hands the flow on: to the Dispatcher, or, for a proxy run without a
//     bootstrap, to Passthrough (passthrough.go), which sends every flow
//     to its original destination, as Istio's PassthroughCluster.
//  3. Dispatcher (dispatch.go). Loads the snapshot in force (one atomic
//     load; the flow keeps it to the end; before the first one, TCP
//     flows are refused) and picks the receiving
//     listener: a flow to one of the pod's own addresses enters the
//     virtual inbound listener (Roles.InboundPort, 15006), any other the
//     virtual outbound one (Roles.OutboundPort, 15001). A UDP flow to
//     the address of a UDP listener goes to step 7's udpproxy, any other
//     UDP flow to the passthrough.
//  4. Hand-off (Snapshot.handOff, snapshot.go). With use_original_dst the
//     receiving listener hands the flow to the listener of its original
//     destination: exact IP:port, else the wildcard of the port, else it
//     keeps it. Connections accepted on a kernel socket of a listener
//     that binds (Server.acceptLoop, server.go) start here, at their
//     listener.
//  5. Listener filters (listenerfilters.go, package sniff). When a chain
//     of the listener matches on what the client sends first,
//     tls_inspector reads the ClientHello (SNI, ALPN) and http_inspector
//     the request line, within listener_filters_timeout. Otherwise
//     nothing is read, and a captured flow's handshake waits until its
//     tcp_proxy (step 7) has connected the upstream, so a refused
//     upstream is a refused connect, as the destination itself would
//     answer.
//  6. Filter-chain match (Listener.selectChain, package filterchain).
//     Envoy's filter_chain_match rules pick one chain, else the default
//     chain, else none (NR: the flow is refused or reset). A chain whose
//     transport_socket is a DownstreamTlsContext (package tlsctx, with
//     the SDS secrets) then terminates TLS (downstream.go): the flow is
//     accepted and the handshake runs over the ClientHello step 5
//     peeked, bounded by transport_socket_connect_timeout and the
//     listener's drain; a failed one ends the flow before any filter
//     (listener ssl.* counters). The filters get a *Downstream: the
//     plaintext and the client's verified identity (Downstream.Peer,
//     for the access log, XFCC and RBAC).
//  7. Network filter. The chain's terminal filter serves the flow
//     (parsed by parseNetworkFilters, filters.go; Istio's telemetry
//     filters are accepted and skipped): package tcpproxy connects the
//     upstream (max_connect_attempts) and splices bytes; package httpconn
//     is the HTTP connection manager (routes, retries, timeouts, its own
//     upstream pools); package udpproxy relays a UDP listener's
//     datagrams.
//  8. Cluster (package cluster). The named cluster picks a host with its
//     load balancer (hosts from static config, DNS, EDS or the original
//     destination), under its circuit breakers, and counts Envoy's
//     cluster stats.
//  9. Upstream (package upstream). Every socket to an upstream is opened
//     by upstream.Dialer, whose SO_MARK keeps the proxy's own traffic out
//     of capture.
//
// Each flow ends with one access-log entry (package accesslog), with
// Envoy's response flags.
//
// The Gate, the Dispatcher and Passthrough are made whole by their
// constructors (NewGate, NewDispatcher, NewPassthrough) before the stack
// delivers a flow, and share one immutable LocalAddrs (local.go), the
// pod's addresses, which decide whether a flow is inbound; while they run
// only the snapshot in force (Dispatcher.Swap) and the Gate's closed
// flags change.
//
// # Where configuration comes from
//
// Build (snapshot.go) validates listeners, clusters, route configurations
// and EDS assignments, each on its own, into a Snapshot, which is
// immutable from then on. XDSApplier (xds.go) builds one from what the
// xDS client delivers; Server.Apply (server.go) binds the sockets of new
// listeners, commits the EDS host sets the build staged and swaps the
// snapshot into the Dispatcher with one atomic store. A resource that
// fails validation, or a listener whose socket cannot bind, is rejected
// alone (xdsclient.ResourceErrors) and keeps its last good version.
//
// Counters are not part of a snapshot: they live in the stats store
// (package stats), one block per Envoy stat scope (cluster.<name>.,
// listener.<address>., tcp.<stat_prefix>., http.<stat_prefix>.), and a
// snapshot holds pointers to the blocks it counts into, so an update that
// rebuilds a resource does not restart its counters.
//
// Draining (drain.go): a listener an update removes or changes drains in
// Envoy's steps (its HTTP connections are asked to close at once; after
// the drain duration every flow still open is closed), and
// Server.StartDrain and EndDrain do the same for the whole proxy on
// /drain_listeners and termination, while the Gate stops new flows.
// Package admin serves the snapshot in force (/config_dump, /clusters,
// /stats).
package mesh
