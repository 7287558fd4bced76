package xdsclient

import (
	"crypto/tls"
	"errors"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/rs/zerolog"
)

// Defaults, as in Envoy and Istio's bootstrap.
const (
	DefaultBackoffBase = 500 * time.Millisecond // Envoy's xDS retry base interval
	DefaultBackoffMax  = 30 * time.Second       // Envoy's xDS retry max interval
	DefaultKeepalive   = 300 * time.Second      // Istio's xds-grpc cluster tcp_keepalive.keepalive_time
	// EnvoyInitialFetchTimeout is Envoy's default initial_fetch_timeout, used by
	// FromBootstrap when the bootstrap does not set one. Istio sets 0s.
	EnvoyInitialFetchTimeout = 15 * time.Second

	// stableStream is how long a stream must stay up for the backoff to start over.
	stableStream = 30 * time.Second
	// maxNackDelay bounds the spacing of identical repeated NACKs (see session.nack).
	maxNackDelay = 5 * time.Second
)

// Config says where the control plane is and how to talk to it.
type Config struct {
	// Server is host:port, or unix:///absolute/path (unix:relative/path).
	Server string
	// Delta selects incremental xDS (DELTA_GRPC, istio-proxy's default); otherwise
	// state of the world (GRPC).
	Delta bool
	// TLS secures the connection; nil means plaintext.
	TLS *tls.Config
	// RootFile, with TLS, is the file TLS.RootCAs was read from (istiod's
	// root-cert.pem): each new connection re-reads it if its size, mtime
	// or inode changed, so a rotated root reaches the xDS TLS without a
	// restart, as pilot-agent rebuilds its connection to pick it up.
	RootFile string
	// FileMetadata, when set, is a header read from a file and sent on every
	// stream (gRPC per-RPC credentials): istiod's bearer token, which
	// Kubernetes rotates under the proxy, so it is re-read for each stream.
	FileMetadata *FileMetadata
	// Node identifies this proxy; it is sent on the first request of each stream
	// (Envoy's set_node_on_first_message_only).
	Node *corev3.Node
	// InitialFetchTimeout bounds how long a cluster set waits for its endpoints and a
	// listener set for its routes before using empty ones, and how long the first
	// CDS response is waited for before listeners are requested. 0 waits forever
	// (Istio's setting).
	InitialFetchTimeout time.Duration
	// BackoffBase and BackoffMax shape the reconnection backoff (exponential, full
	// jitter). Zero means DefaultBackoffBase and DefaultBackoffMax.
	BackoffBase, BackoffMax time.Duration
	// Keepalive is the TCP keepalive idle time of the connection; zero means
	// DefaultKeepalive, negative disables keepalive.
	Keepalive time.Duration
	// Log receives connection events and rejections.
	Log zerolog.Logger

	// Control, when set, is called on every socket the client opens before
	// it connects (net.Dialer.Control). meshtun sets SO_MARK there: the
	// control-plane connection must bypass the proxy's own capture.
	Control func(network, address string, c syscall.RawConn) error

	// UserAgentVersion is sent as node.user_agent_version (name "meshtun")
	// unless the bootstrap's node sets them; default "dev".
	UserAgentVersion string

	// Busy, when set, is called as the client starts on a response of
	// LargeResponse resources or more, and the function it returns once
	// the client is done with it: decoded, applied if it completes an
	// update, ACKed or NACKed. The process may give the client more CPU
	// meanwhile (meshtun raises GOMAXPROCS; the decoding runs on as many
	// goroutines as GOMAXPROCS allows).
	Busy func() (done func())
}

// LargeResponse is the number of resources from which a response is
// large (Config.Busy) and is decoded on several goroutines.
const LargeResponse = 1000

func (c Config) withDefaults() Config {
	if c.BackoffBase <= 0 {
		c.BackoffBase = DefaultBackoffBase
	}
	if c.BackoffMax <= 0 {
		c.BackoffMax = DefaultBackoffMax
	}
	if c.BackoffMax < c.BackoffBase {
		c.BackoffMax = c.BackoffBase
	}
	if c.Keepalive == 0 {
		c.Keepalive = DefaultKeepalive
	}
	if c.Node == nil {
		c.Node = &corev3.Node{}
	}
	return c
}

func (c Config) validate() error {
	if c.Server == "" {
		return errors.New("xdsclient: Config.Server is empty")
	}
	if c.InitialFetchTimeout < 0 {
		return errors.New("xdsclient: Config.InitialFetchTimeout is negative")
	}
	return nil
}

// FileMetadata is Envoy's envoy.grpc_credentials.file_based_metadata: the
// contents of File, after Prefix, sent as the header Key.
type FileMetadata struct {
	File string
	// Key is the header name; "authorization" when empty.
	Key string
	// Prefix goes before the file's contents ("Bearer " for a token).
	Prefix string
}
