package secrets

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/rs/zerolog"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
)

// SecretType is the type URL of SDS resources.
const SecretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// ClientOptions configures a Client.
type ClientOptions struct {
	Store *Store
	// Node is sent on each stream's first request.
	Node *corev3.Node
	// Target resolves an envoy_grpc cluster name to a gRPC target
	// ("unix:/path" for a pipe host, "ip:port" otherwise), from the
	// configuration in force.
	Target func(cluster string) (string, error)
	Log    zerolog.Logger
	// Retry is the wait before a failed stream is opened again (1 s when 0).
	Retry time.Duration
}

// Client subscribes, over SDS (state of the world), to the secrets the
// configuration references, one stream per sds_config cluster, and puts
// what arrives in the store.
type Client struct {
	o ClientOptions

	mu      sync.Mutex
	streams map[string]*stream // by cluster
	closed  bool
}

// NewClient returns a client with no subscription.
func NewClient(o ClientOptions) *Client {
	if o.Retry == 0 {
		o.Retry = time.Second
	}
	return &Client{o: o, streams: map[string]*stream{}}
}

// Watch makes refs the references of the configuration: the store
// follows them, and each cluster's stream asks for exactly its names (a
// stream whose names are all gone ends). Secrets delivered over ADS are
// not fetched here: the xDS client's ADS stream subscribes to them and the
// proxy puts them in the same store.
func (c *Client) Watch(refs *Refs) {
	c.o.Store.SetRefs(refs)
	byCluster := map[string][]string{}
	for name, src := range refs.Names {
		if src.ADS {
			continue
		}
		byCluster[src.Cluster] = append(byCluster[src.Cluster], name)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	for cl, st := range c.streams {
		if _, ok := byCluster[cl]; !ok {
			st.stop()
			delete(c.streams, cl)
		}
	}
	for cl, names := range byCluster {
		slices.Sort(names)
		st := c.streams[cl]
		if st == nil {
			st = c.start(cl)
			c.streams[cl] = st
		}
		st.setNames(names)
	}
}

// Close ends every stream and waits for them.
func (c *Client) Close() {
	c.mu.Lock()
	c.closed = true
	streams := slices.Collect(maps.Values(c.streams))
	c.streams = nil
	c.mu.Unlock()
	for _, st := range streams {
		st.stop()
	}
}

// stream is one SDS stream to a cluster, reopened after a failure.
type stream struct {
	c       *Client
	cluster string
	log     zerolog.Logger
	cancel  context.CancelFunc
	done    chan struct{}

	mu      sync.Mutex
	names   []string
	changed chan struct{} // signalled when names change
}

func (c *Client) start(cluster string) *stream {
	ctx, cancel := context.WithCancel(context.Background())
	st := &stream{c: c, cluster: cluster, log: c.o.Log.With().Str("cluster", cluster).Logger(),
		cancel: cancel, done: make(chan struct{}), changed: make(chan struct{}, 1)}
	go func() {
		defer close(st.done)
		for {
			err := st.run(ctx)
			if ctx.Err() != nil {
				return
			}
			st.log.Warn().Err(err).Dur("retry_in", c.o.Retry).Msg("sds: stream failed, retrying")
			t := time.NewTimer(c.o.Retry)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}()
	return st
}

func (st *stream) stop() {
	st.cancel()
	<-st.done
}

func (st *stream) setNames(names []string) {
	st.mu.Lock()
	same := slices.Equal(st.names, names)
	st.names = names
	st.mu.Unlock()
	if !same {
		select {
		case st.changed <- struct{}{}:
		default:
		}
	}
}

func (st *stream) currentNames() []string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.names
}

// run opens one stream and serves it until it fails or ctx ends.
func (st *stream) run(ctx context.Context) error {
	target, err := st.c.o.Target(st.cluster)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("sds cluster %q (%s): %w", st.cluster, target, err)
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(sctx)
	if err != nil {
		return fmt.Errorf("sds cluster %q (%s): %w", st.cluster, target, err)
	}
	resps := make(chan *discoveryv3.DiscoveryResponse)
	errc := make(chan error, 1)
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case resps <- r:
			case <-sctx.Done():
				return
			}
		}
	}()
	names := st.currentNames()
	var version, nonce string
	req := &discoveryv3.DiscoveryRequest{Node: st.c.o.Node, TypeUrl: SecretType, ResourceNames: names}
	if err := s.Send(req); err != nil {
		return fmt.Errorf("sds cluster %q: send: %w", st.cluster, err)
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errc:
			return fmt.Errorf("sds cluster %q (%s): %w", st.cluster, target, err)
		case <-st.changed:
			if n := st.currentNames(); !slices.Equal(n, names) {
				names = n
				if err := s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: SecretType, VersionInfo: version,
					ResponseNonce: nonce, ResourceNames: names}); err != nil {
					return fmt.Errorf("sds cluster %q: send: %w", st.cluster, err)
				}
			}
		case r := <-resps:
			nonce = r.GetNonce()
			ack := &discoveryv3.DiscoveryRequest{TypeUrl: SecretType, ResponseNonce: nonce, ResourceNames: names}
			if err := st.apply(r); err != nil {
				st.log.Warn().Err(err).Str("version", r.GetVersionInfo()).Msg("sds: secrets rejected")
				ack.VersionInfo = version
				ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
			} else {
				version = r.GetVersionInfo()
				ack.VersionInfo = version
			}
			if err := s.Send(ack); err != nil {
				return fmt.Errorf("sds cluster %q: send: %w", st.cluster, err)
			}
		}
	}
}

// apply decodes every secret of r first and stores them only if all are
// valid: a response is accepted or rejected whole.
func (st *stream) apply(r *discoveryv3.DiscoveryResponse) error {
	if r.GetTypeUrl() != SecretType {
		return fmt.Errorf("type_url %q: want %s", r.GetTypeUrl(), SecretType)
	}
	secs := make([]*tlsv3.Secret, 0, len(r.GetResources()))
	for i, a := range r.GetResources() {
		sec := &tlsv3.Secret{}
		if err := a.UnmarshalTo(sec); err != nil {
			return fmt.Errorf("resources[%d]: %w", i, err)
		}
		if _, err := parse(sec); err != nil {
			return fmt.Errorf("secret %q: %w", sec.GetName(), err)
		}
		secs = append(secs, sec)
	}
	now := time.Now()
	for _, sec := range secs {
		if err := st.c.o.Store.Put(r.GetVersionInfo(), sec, now); err != nil {
			return err
		}
		st.log.Info().Str("secret", sec.GetName()).Str("version", r.GetVersionInfo()).Msg("sds: secret updated")
	}
	return nil
}
