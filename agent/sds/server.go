// Package sds is the agent's Secret Discovery Service: the workload
// certificate and trust bundle the CA client obtains, served to the proxy
// (meshtun's, or a real Envoy) over a Unix domain socket, as pilot-agent
// serves them to Envoy.
//
// Two names exist, the ones istiod's generated config references: "default"
// (tls_certificate: the issued chain and key) and "ROOTCA"
// (validation_context.trusted_ca: the trust bundle). A request for a name
// that has no secret yet gets no answer until it has one, which is what
// Envoy's warming with initial_fetch_timeout 0s waits for; every Update
// pushes the secrets that changed to every stream subscribed to them. Both
// SotW (StreamSecrets) and delta (DeltaSecrets) streams are served, and the
// unary FetchSecrets. Envoy opens one stream per secret config, so a SotW
// response usually holds exactly the one secret Envoy's SdsApi expects; a
// stream naming several gets only those that changed.
//
// The server is written on the generated gRPC service rather than
// go-control-plane's server and cache: two fixed names need no snapshot
// cache keyed by node, and what the agent needs beside the protocol (the
// names a proxy is waiting for, for readiness; one log line per unknown
// name; a version that moves only when a secret's bytes do) would sit on
// top of the cache anyway.
package sds

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
)

// DefaultSocketPath is Istio's socket (WorkloadIdentityPath + "socket"),
// relative to the working directory as in the sidecar ("./var/run/...").
const DefaultSocketPath = "./var/run/secrets/workload-spiffe-uds/socket"

// Options configures a Server.
type Options struct {
	// SocketPath is where the socket is created; DefaultSocketPath when empty.
	// Missing directories are created (0755: the proxy must reach the socket).
	SocketPath string
	// SocketMode is the socket's permission; 0600 when zero (the proxy runs
	// as the agent's user, as Envoy does under pilot-agent). Use 0660 to let
	// a proxy of the same group connect.
	SocketMode os.FileMode
	Log        zerolog.Logger
}

// Server serves SDS on a Unix domain socket. Create it with New, feed it
// with Update, stop it with Close.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer

	path string
	log  zerolog.Logger
	grpc *grpc.Server
	done chan struct{} // closed by Close: streams return
	wg   sync.WaitGroup

	snap atomic.Pointer[snapshot]

	mu        sync.Mutex // guards writes to snap, and subs, unknown
	subs      map[string]int
	unknown   map[string]bool
	streamSeq atomic.Uint64

	closeOnce sync.Once
	closeErr  error
}

// New creates the socket and starts serving on it. A socket left by a
// crashed run is replaced; a path where a server still answers, or that is
// not a socket, is an error (it belongs to someone else, e.g. a SPIRE agent).
func New(o Options) (*Server, error) {
	path := o.SocketPath
	if path == "" {
		path = DefaultSocketPath
	}
	mode := o.SocketMode
	if mode == 0 {
		mode = 0o600
	}
	ln, err := listen(path, mode)
	if err != nil {
		return nil, fmt.Errorf("sds: socket %s: %w", path, err)
	}
	s := &Server{
		path:    path,
		log:     o.Log,
		grpc:    grpc.NewServer(grpc.WaitForHandlers(true)),
		done:    make(chan struct{}),
		subs:    map[string]int{},
		unknown: map[string]bool{},
	}
	s.snap.Store(emptySnapshot())
	secretv3.RegisterSecretDiscoveryServiceServer(s.grpc, s)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.grpc.Serve(ln); err != nil {
			s.log.Error().Err(err).Str("socket", path).Msg("SDS server stopped")
		}
	}()
	s.log.Info().Str("socket", path).Msg("SDS server listening")
	return s, nil
}

// listen binds the socket under a temporary name in a fresh 0700 directory
// beside path, sets its mode, then renames it over path: the socket is never
// reachable with the umask's permissions, and a stale socket is replaced in
// one step.
func listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("exists and is not a socket (%v)", fi.Mode().Type())
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, errors.New("another server is listening on it")
		}
	}
	// Short temporary names: a socket path is limited to 107 bytes.
	tmp, err := os.MkdirTemp(dir, ".s")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	tpath := filepath.Join(tmp, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tpath, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// The listener's own unlink would target the temporary name; Close
	// removes path instead.
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tpath, mode); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Rename(tpath, path); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Update replaces the served identity and pushes what changed: "default"
// whenever the chain or key changed, "ROOTCA" only when RootsPEM did. An
// invalid identity (no chain, key not matching the leaf, no roots) is an
// error naming the field, and the previous identity keeps being served.
func (s *Server) Update(id Identity) error {
	notAfter, err := id.validate()
	if err != nil {
		return err
	}
	if id.Expire.IsZero() {
		id.Expire = notAfter
	}
	id.ChainPEM = append([]byte(nil), id.ChainPEM...)
	id.KeyPEM = append([]byte(nil), id.KeyPEM...)
	id.RootsPEM = append([]byte(nil), id.RootsPEM...)
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.snap.Load()
	next, err := prev.next(id)
	if err != nil {
		return err
	}
	s.snap.Store(next)
	close(prev.changed)
	var changed []string
	for name, e := range next.secrets {
		if e.version == next.versionS {
			changed = append(changed, name)
		}
	}
	sort.Strings(changed)
	s.log.Info().Strs("changed", changed).Str("version", next.versionS).Time("expire", id.Expire).Msg("SDS identity updated")
	return nil
}

// Current returns the identity being served, and false before the first
// Update. The byte slices must not be modified.
func (s *Server) Current() (Identity, bool) {
	sn := s.snap.Load()
	return sn.id, sn.gen > 0
}

// Pending lists, sorted, the names some stream has asked for that have no
// secret yet: what the proxy is warming on, for readiness to report.
func (s *Server) Pending() []string {
	sn := s.snap.Load()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for name, n := range s.subs {
		if _, ok := sn.secrets[name]; n > 0 && !ok {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// subscribe and unsubscribe keep the count of streams per name (for
// Pending) and log a name this server will never have, once per name.
func (s *Server) subscribe(names []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range names {
		s.subs[n]++
		if n != WorkloadCert && n != RootCA && !s.unknown[n] {
			s.unknown[n] = true
			s.log.Warn().Str("secret", n).Msg("SDS request for a secret this agent does not serve (only \"default\" and \"ROOTCA\"); it will get no answer")
		}
	}
}

func (s *Server) unsubscribe(names []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range names {
		if s.subs[n]--; s.subs[n] <= 0 {
			delete(s.subs, n)
		}
	}
}

// Close stops every stream, the server and removes the socket. It is
// idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.done)
		s.grpc.Stop()
		s.wg.Wait()
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.closeErr = fmt.Errorf("sds: removing socket: %w", err)
		}
		s.log.Info().Str("socket", s.path).Msg("SDS server closed")
	})
	return s.closeErr
}
