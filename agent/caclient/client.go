package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// Istio's paths and defaults (pilot-agent options, pkg/config/constants).
const (
	DefaultRootFile  = "./var/run/secrets/istio/root-cert.pem"
	DefaultTokenFile = "./var/run/secrets/tokens/istio-token"
	DefaultCAAddr    = "istiod.istio-system.svc:15012"
	DefaultTTL       = 24 * time.Hour
)

// Options configure a Client. Zero values take Istio's defaults.
type Options struct {
	// Addr is the CA's host:port (CA_ADDR; default: the discovery address).
	Addr string
	// RootFile verifies the CA's serving certificate.
	RootFile string
	// ServerName is checked on the CA's certificate (ISTIOD_SAN); "" is
	// the host of Addr ("localhost" meaning istiod.istio-system.svc, as
	// pilot-agent does).
	ServerName string
	// TokenFile holds the bearer token, re-read on every call; a missing
	// file sends no token.
	TokenFile string
	// ClusterID is sent as the "ClusterID" metadata (ISTIO_META_CLUSTER_ID).
	ClusterID string
	// TrustDomain, Namespace and ServiceAccount make the CSR's SAN
	// spiffe://<TrustDomain>/ns/<Namespace>/sa/<ServiceAccount>.
	TrustDomain, Namespace, ServiceAccount string
	KeyType                                KeyType
	RSAKeySize                             int
	// TTL is the requested validity (SECRET_TTL).
	TTL time.Duration
	// GraceRatio of the lifetime, ± GraceJitter, is left when the
	// certificate is re-issued (SECRET_GRACE_PERIOD_RATIO, 0.5, and
	// SECRET_GRACE_PERIOD_RATIO_JITTER, 0.01).
	GraceRatio, GraceJitter float64
	// InitialBackoff doubles after each failure up to MaxBackoff (1 s and
	// 30 s by default); the client never gives up.
	InitialBackoff, MaxBackoff time.Duration
	// MaxBackoffUnready bounds the wait instead while no certificate is
	// in force (1 s, or MaxBackoff if lower): see retryWait.
	MaxBackoffUnready time.Duration
	// CallTimeout bounds one CreateCertificate call (10 s).
	CallTimeout time.Duration
	// Control, when set, is called on every socket before it connects
	// (net.Dialer.Control): the agent sets the capture bypass mark there,
	// since its own connection to the CA must not be captured into the
	// pod's proxy (pilot-agent is kept out by running as UID 1337).
	Control func(network, address string, c syscall.RawConn) error
	Log     zerolog.Logger
}

// OptionsFromEnv reads pilot-agent's environment variables: CA_ADDR
// (default discoveryAddr), TRUST_DOMAIN, POD_NAMESPACE, SERVICE_ACCOUNT,
// ISTIOD_SAN, ISTIO_META_CLUSTER_ID, SECRET_TTL, ECC_SIGNATURE_ALGORITHM,
// WORKLOAD_RSA_KEY_SIZE, SECRET_GRACE_PERIOD_RATIO(_JITTER).
func OptionsFromEnv(getenv func(string) string, discoveryAddr string) (Options, error) {
	o := Options{Addr: getenv("CA_ADDR"), TrustDomain: getenv("TRUST_DOMAIN"), Namespace: getenv("POD_NAMESPACE"),
		ServiceAccount: getenv("SERVICE_ACCOUNT"), ServerName: getenv("ISTIOD_SAN"), ClusterID: getenv("ISTIO_META_CLUSTER_ID")}
	if o.Addr == "" {
		o.Addr = discoveryAddr
	}
	if v := getenv("SECRET_TTL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return o, fmt.Errorf("SECRET_TTL %q: not a duration (e.g. 24h)", v)
		}
		o.TTL = d
	}
	switch v := getenv("ECC_SIGNATURE_ALGORITHM"); v {
	case "":
	case "ECDSA":
		o.KeyType = ECDSA
	default:
		return o, fmt.Errorf("ECC_SIGNATURE_ALGORITHM %q: valid choices: ECDSA (or unset for RSA)", v)
	}
	for env, dst := range map[string]*float64{"SECRET_GRACE_PERIOD_RATIO": &o.GraceRatio, "SECRET_GRACE_PERIOD_RATIO_JITTER": &o.GraceJitter} {
		if v := getenv(env); v != "" {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f < 0 || f >= 1 {
				return o, fmt.Errorf("%s %q: want a number in [0, 1)", env, v)
			}
			*dst = f
		}
	}
	if v := getenv("WORKLOAD_RSA_KEY_SIZE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 2048 {
			return o, fmt.Errorf("WORKLOAD_RSA_KEY_SIZE %q: want an integer of at least 2048", v)
		}
		o.RSAKeySize = n
	}
	return o, nil
}

// Client keeps a workload certificate from an Istio CA current; see the
// package doc. Run drives it; Current, Subscribe and Err are safe for
// concurrent use.
type Client struct {
	publisher
	o Options
}

// New checks o and fills in the defaults.
func New(o Options) (*Client, error) {
	if o.Addr == "" {
		o.Addr = DefaultCAAddr
	}
	host, _, err := net.SplitHostPort(o.Addr)
	if err != nil {
		return nil, fmt.Errorf("CA address %q: want host:port", o.Addr)
	}
	if o.ServerName == "" {
		o.ServerName = host
		if host == "localhost" {
			o.ServerName = "istiod.istio-system.svc"
		}
	}
	if o.RootFile == "" {
		o.RootFile = DefaultRootFile
	}
	if o.TokenFile == "" {
		o.TokenFile = DefaultTokenFile
	}
	if o.TrustDomain == "" {
		o.TrustDomain = "cluster.local"
	}
	if o.Namespace == "" || o.ServiceAccount == "" {
		return nil, fmt.Errorf("CA client: namespace %q and service account %q are both required (POD_NAMESPACE, SERVICE_ACCOUNT)", o.Namespace, o.ServiceAccount)
	}
	if o.TTL <= 0 {
		o.TTL = DefaultTTL
	}
	if o.GraceRatio == 0 {
		o.GraceRatio = 0.5
	}
	if o.GraceJitter == 0 {
		o.GraceJitter = 0.01
	}
	if o.InitialBackoff <= 0 {
		o.InitialBackoff = time.Second
	}
	if o.MaxBackoff < o.InitialBackoff {
		o.MaxBackoff = max(30*time.Second, o.InitialBackoff)
	}
	if o.MaxBackoffUnready <= 0 {
		o.MaxBackoffUnready = time.Second
	}
	o.MaxBackoffUnready = min(o.MaxBackoffUnready, o.MaxBackoff)
	if o.CallTimeout <= 0 {
		o.CallTimeout = 10 * time.Second
	}
	return &Client{o: o}, nil
}

// SPIFFEID is the identity the client asks for.
func (c *Client) SPIFFEID() string {
	return "spiffe://" + c.o.TrustDomain + "/ns/" + c.o.Namespace + "/sa/" + c.o.ServiceAccount
}

// Run gets a certificate, then re-issues it at its rotation time, until
// ctx is done. A failure is retried with a doubling backoff (bounded by
// MaxBackoff), forever; meanwhile the current certificate stays in force
// until it expires, and then Current is nil. Errors go to Err and the log.
func (c *Client) Run(ctx context.Context) {
	backoff := c.o.InitialBackoff
	for {
		id, err := c.Fetch(ctx)
		var wait time.Duration
		if err == nil {
			c.publish(id)
			backoff = c.o.InitialBackoff
			wait = time.Until(c.rotateAt(id))
			c.o.Log.Info().Str("identity", id.SPIFFEID).Str("serial", id.Serial).Time("expires", id.NotAfter).
				Dur("rotate_in", wait.Round(time.Millisecond)).Msg("workload certificate issued")
		} else {
			if ctx.Err() != nil {
				return
			}
			c.fail(err)
			wait = backoff
			backoff = min(backoff*2, c.o.MaxBackoff)
			cur := c.Current()
			if cur != nil && !time.Now().Before(cur.NotAfter) {
				c.publish(nil)
				c.fail(err)
				cur = nil
				c.o.Log.Error().Msg("workload certificate expired and no new one could be issued")
			}
			wait = c.retryWait(wait, cur, time.Now())
			c.o.Log.Warn().Err(err).Dur("retry_in", wait).Msg("certificate request failed")
		}
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// retryWait bounds the backoff wait after a failure: with a certificate
// in force, by its expiry (one more try before it lapses); without one, by
// MaxBackoffUnready, since the pod is not ready until a certificate
// comes and must follow a CA coming back within about a second, while a
// pod that serves can let the wait grow to MaxBackoff.
func (c *Client) retryWait(backoff time.Duration, cur *Identity, now time.Time) time.Duration {
	if cur != nil {
		return min(backoff, cur.NotAfter.Sub(now))
	}
	return min(backoff, c.o.MaxBackoffUnready)
}

// rotateAt is when id is re-issued: with grace = (ratio ± jitter) ×
// lifetime, at NotAfter − grace (secretcache.go rotateTime).
func (c *Client) rotateAt(id *Identity) time.Time {
	jitter := (rand.Float64()*2 - 1) * c.o.GraceJitter
	life := id.NotAfter.Sub(id.Received)
	return id.NotAfter.Add(-time.Duration((c.o.GraceRatio + jitter) * float64(life)))
}

// Fetch makes a new key and gets it a certificate: one attempt, over a
// new connection (so a rotated root file is picked up, as pilot-agent
// rebuilds its connection after an error).
func (c *Client) Fetch(ctx context.Context) (*Identity, error) {
	rootPEM, err := os.ReadFile(c.o.RootFile)
	if err != nil {
		return nil, fmt.Errorf("CA root file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("CA root file %s: no PEM certificate", c.o.RootFile)
	}
	tc := &tls.Config{RootCAs: pool, ServerName: c.o.ServerName, MinVersion: tls.VersionTLS12}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithPerRPCCredentials(tokenCreds{file: c.o.TokenFile, clusterID: c.o.ClusterID})}
	if c.o.Control != nil {
		d := net.Dialer{Control: c.o.Control}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}))
	}
	conn, err := grpc.NewClient(c.o.Addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("CA at %s: %v", c.o.Addr, err)
	}
	defer conn.Close()
	keyPEM, csrPEM, err := newKeyAndCSR(c.o.KeyType, c.o.RSAKeySize, c.SPIFFEID())
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.o.CallTimeout)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(csrPEM), ValidityDuration: int64(c.o.TTL / time.Second)})
	if err != nil {
		return nil, c.explain(err)
	}
	if len(resp.GetCertChain()) <= 1 {
		return nil, fmt.Errorf("CA at %s: %w (%d elements; want the leaf and the root at least)", c.o.Addr, errNoChain, len(resp.GetCertChain()))
	}
	chain := make([][]byte, 0, len(resp.GetCertChain()))
	for _, s := range resp.GetCertChain() {
		chain = append(chain, splitPEM([]byte(s))...)
	}
	return newIdentity("CA at "+c.o.Addr+": response", chain, keyPEM, nil, time.Now())
}

// explain turns a CreateCertificate error into one that says what to fix:
// the token file for Unauthenticated, the root file for a TLS failure.
func (c *Client) explain(err error) error {
	st, _ := status.FromError(err)
	switch {
	case st.Code() == codes.Unauthenticated:
		missing := ""
		if _, serr := os.Stat(c.o.TokenFile); serr != nil {
			missing = ", which could not be read: no token was sent"
		}
		return fmt.Errorf("CA rejected the token (file %s%s): %s: %s", c.o.TokenFile, missing, c.o.Addr, st.Message())
	case st.Code() == codes.Unavailable && isTLSError(st.Message()):
		return fmt.Errorf("TLS to the CA at %s failed (server name %q, verified against the root file %s): %s",
			c.o.Addr, c.o.ServerName, c.o.RootFile, st.Message())
	}
	return fmt.Errorf("CA at %s: %s: %s", c.o.Addr, st.Code(), st.Message())
}

func isTLSError(msg string) bool {
	for _, s := range []string{"x509:", "tls:", "handshake", "certificate"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// tokenCreds sends "authorization: Bearer <token>", the token re-read from
// its file on every call (a projected service account token is rotated
// under the agent), and "ClusterID". A missing token file sends no
// authorization, as pilot-agent does; the CA then says Unauthenticated.
type tokenCreds struct {
	file, clusterID string
}

func (t tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := map[string]string{}
	if t.clusterID != "" {
		md["ClusterID"] = t.clusterID
	}
	b, err := os.ReadFile(t.file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return md, nil
		}
		return nil, fmt.Errorf("token file: %w", err)
	}
	if tok := strings.TrimSpace(string(b)); tok != "" {
		md["authorization"] = "Bearer " + tok
	}
	return md, nil
}

func (tokenCreds) RequireTransportSecurity() bool { return true }
