// Package tlsctx compiles Envoy's envoy.transport_sockets.tls contexts
// (UpstreamTlsContext, DownstreamTlsContext) into crypto/tls handshakes that
// behave as Envoy's do where a peer can tell: the same versions, ciphers and
// curves, the certificate and trust bundle looked up by SDS name at every
// handshake (so a rotation reaches the next connection and leaves open
// ones alone), peer verification in VerifyConnection (so resumed sessions
// are checked again), Envoy's subject-alt-name matchers, its ALPN choices
// (a server picks in its own order and proceeds without ALPN when nothing
// overlaps; nobody offers or picks istio-peer-exchange, whose framing
// meshtun does not speak) and its ssl.* counters.
//
// A context that asks for something meshtun cannot honour (a private-key
// provider, a custom validator, CRLs, ...) is refused with an error naming
// the field, never half-applied: silently skipping a security setting
// would accept peers the configuration meant to refuse.
//
// The package knows secrets only through mesh/secrets.Store; it does not
// know clusters or listeners, which hold what it returns.
package tlsctx
