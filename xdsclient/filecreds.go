package xdsclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc/credentials"
)

// fileCreds sends a FileMetadata header on every stream, the file re-read
// each time: a projected service-account token is rotated on disk, and a
// new stream (a reconnection) must carry the current one, as pilot-agent's
// token provider re-reads istio-token on every call.
type fileCreds struct{ m FileMetadata }

var _ credentials.PerRPCCredentials = fileCreds{}

func (f fileCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(f.m.File)
	if err != nil {
		// The stream fails with this error, naming the file, rather than
		// going out without the token and being refused for a reason the
		// log would not explain.
		return nil, fmt.Errorf("xDS token: %w", err)
	}
	key := f.m.Key
	if key == "" {
		key = "authorization"
	}
	return map[string]string{strings.ToLower(key): f.m.Prefix + strings.TrimSpace(string(b))}, nil
}

// RequireTransportSecurity keeps a token off a plaintext connection.
func (fileCreds) RequireTransportSecurity() bool { return true }

// rootCreds is TLS whose trusted roots are re-read from a file at each
// new connection when the file changed (size, mtime, or a different file
// renamed over it, as a Kubernetes volume swaps it): istiod's root is
// rotated under a running proxy, and every stream after the rotation
// must verify against the new one. An unchanged file is not read again.
type rootCreds struct {
	base *tls.Config // RootCAs replaced per handshake
	file string

	mu   sync.Mutex
	fi   os.FileInfo // of the last read
	pool *x509.CertPool
}

var _ credentials.TransportCredentials = (*rootCreds)(nil)

func newRootCreds(base *tls.Config, file string) *rootCreds {
	return &rootCreds{base: base, file: file}
}

// roots is the pool of the file as it is now: read again only when it
// changed. A file that cannot be read or holds no certificate fails the
// handshake naming it; the pool last read is not used then, so a broken
// rotation shows instead of going on against a stale root.
func (r *rootCreds) roots() (*x509.CertPool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fi, err := os.Stat(r.file)
	if err != nil {
		return nil, fmt.Errorf("xDS root file: %w", err)
	}
	if r.pool != nil && fi.Size() == r.fi.Size() && fi.ModTime().Equal(r.fi.ModTime()) && os.SameFile(fi, r.fi) {
		return r.pool, nil
	}
	b, err := os.ReadFile(r.file)
	if err != nil {
		return nil, fmt.Errorf("xDS root file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("xDS root file %s: no PEM certificate", r.file)
	}
	r.fi, r.pool = fi, pool
	return pool, nil
}

func (r *rootCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pool, err := r.roots()
	if err != nil {
		return nil, nil, err
	}
	cfg := r.base.Clone()
	cfg.RootCAs = pool
	conn, info, err := credentials.NewTLS(cfg).ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (verified against the root file %s)", err, r.file)
	}
	return conn, info, nil
}

func (r *rootCreds) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("xDS root credentials: client side only")
}

func (r *rootCreds) Info() credentials.ProtocolInfo { return credentials.NewTLS(r.base).Info() }

func (r *rootCreds) Clone() credentials.TransportCredentials {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &rootCreds{base: r.base.Clone(), file: r.file, fi: r.fi, pool: r.pool}
}

func (r *rootCreds) OverrideServerName(name string) error {
	r.base = r.base.Clone()
	r.base.ServerName = name
	return nil
}
