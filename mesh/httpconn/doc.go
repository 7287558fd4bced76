// Package httpconn is Envoy's HTTP connection manager
// (envoy.filters.network.http_connection_manager) as a library: it parses
// and validates the filter's config (ParseHCM) and route configurations
// (CompileRoutes), and serves HTTP/1.1 and cleartext HTTP/2 on one
// downstream connection (Config.Serve): virtual host and route matching,
// the RBAC and fault filters, and the router with retries, timeouts, circuit
// breakers and per-cluster upstream connection pools (Pools).
//
// It follows Envoy's names and semantics (response flags, local reply
// bodies, header names, stats); where it simplifies, the doc comment of
// the affected function says how.
//
// # Why net/http, and where not
//
// The HTTP/2 codec is net/http's: Go 1.24+ serves HTTP/2 with prior
// knowledge on a plaintext connection (http.Protocols with
// UnencryptedHTTP2), and its Transport speaks either to an upstream over
// connections we dial. So there is no second HTTP/2 implementation
// (golang.org/x/net/http2 is the same code, bundled in the standard
// library). codec_type AUTO tells HTTP/2 from HTTP/1.1 by the preface, as
// Envoy does. An h2c connection gets its own http.Server on a
// one-connection listener, which makes drain per connection: at the
// drain's start it gets GOAWAY from the server's shutdown hook while
// in-flight requests finish; at the drain's end the connection is closed.
//
// HTTP/1.x downstream is served by the proxy's own loop (h1serve.go,
// h1writer.go) rather than http.Server, whose per-request background
// read goroutine, context and flush were most of the connection
// manager's CPU. Heads are still parsed by net/http (http.ReadRequest,
// fuzzed and maintained), with the checks its server adds; what net/http
// tolerates and hides from the handler (Content-Length with
// Transfer-Encoding, HTTP/1.0 with Transfer-Encoding, two Host fields, a
// head trickling in for ever) is refused by h1Guard, which follows the
// request framing on the bytes underneath without parsing requests
// itself. The loop runs each request on the connection's goroutine,
// writes responses with net/http's framing, flushes once per response
// (once for a batch of pipelined ones) and, at the drain's start, answers
// "Connection: close" and closes an idle connection; at the drain's end
// the connection is closed. Upstream, HTTP/1.1 goes through h1Transport: keep-alive
// connections per host address, the request written and the response read
// on the stream's own goroutine (http.Transport's per-connection read and
// write goroutines cost two hand-offs per request, the largest share of
// the proxy's added latency on one or two processors); h2c uses one
// http.Transport per cluster. Both dial through cluster.ConnectHost, so
// pooled connections count against max_connections, carry the
// capture-bypass mark and show in cx stats. The host is picked per request
// by the cluster's load balancer (with the previous_hosts retry predicate)
// before the transport runs. Request bodies stream upstream as they arrive
// while a bounded copy is kept for retries (retryBody, Envoy's retry
// buffering); a request is pending (max_pending_requests) only while it
// waits for a new connection: while one is dialed, or, over HTTP/1.1 with
// the cluster at max_connections, until a connection is released to the
// pool (Envoy queues such a request rather than failing it).
//
// The cost is a few allocations per request that a purpose-built codec
// would avoid (header map clone, request struct); route matching itself
// allocates nothing.
//
// # Where things are
//
// A request goes through the files in this order:
//
//   - serve.go: one downstream connection (codec sniffing, the h2c
//     http.Server, drain, HTTP/2 limits and premature resets), the
//     stream's local replies and timers.
//   - h1serve.go, h1writer.go: the HTTP/1.x serving loop and its
//     ResponseWriter.
//   - h1guard.go: the HTTP/1 framing checks under the loop's parser
//     (smuggling shapes, the 408 for a head that does not arrive).
//   - stream.go: one request: its state, path handling, route and
//     cluster selection, the RBAC and fault filters, the route's action.
//   - rbac.go: envoy.filters.http.rbac on the mesh/rbac engine, with
//     RBACPerRoute overrides.
//   - forwarded.go: the connection manager's request edits
//     (x-forwarded-for, internal requests, x-request-id).
//   - router.go: the router filter: the upstream request and its
//     attempts, how an attempt's failure is classified.
//   - retry.go, body.go: retry policies and back-off; the request body
//     as attempts replay it.
//   - relay.go: the upstream response copied downstream (a streaming
//     one flushed as it comes).
//   - upgrade.go, tunnel.go: upgrade_configs, and an upgraded exchange
//     (WebSocket; RFC 8441 over h2c) spliced both ways.
//   - grpc.go: a gRPC call's grpc-timeout as the router timeout
//     (max_grpc_timeout) and the max stream duration.
//   - reply.go: answers that need no upstream (direct responses,
//     redirects, fault aborts, failures before a response).
//   - h1.go, pool.go, streampool.go: upstream connections and the
//     per-request objects reused across requests.
//
// Configuration lives in config.go, routes.go, match.go, headers.go,
// filters.go and path.go.
package httpconn
