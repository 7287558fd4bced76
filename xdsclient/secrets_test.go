package xdsclient

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// secretSink accepts every configuration and keeps the secrets it is given,
// refusing (by name) one whose trusted CA is not PEM, as the proxy's store
// does; a refused secret keeps its last good version.
type secretSink struct {
	mu   sync.Mutex
	got  map[string]*tlsv3.Secret
	seen map[string]bool // every name ever handed over
}

func (s *secretSink) Apply(context.Context, *Resources) error { return nil }

func (s *secretSink) ApplySecrets(_ string, secs []*tlsv3.Secret) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs ResourceErrors
	for _, sec := range secs {
		s.seen[sec.GetName()] = true
		if ca := sec.GetValidationContext().GetTrustedCa().GetInlineBytes(); !strings.HasPrefix(string(ca), "-----BEGIN") {
			errs = append(errs, ResourceError{TypeURL: SecretType, Name: sec.GetName(), Err: errors.New("validation_context.trusted_ca: no PEM certificate")})
			continue
		}
		s.got[sec.GetName()] = sec
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func (s *secretSink) get(name string) *tlsv3.Secret {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got[name]
}

func (s *secretSink) handed(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen[name]
}

// TestADSSecrets: secrets named by WatchSecrets are subscribed to over the ADS
// stream (exactly those names), handed to the SecretApplier and ACKed; a bad
// one is NACKed naming it while the good one of the same response is stored;
// the fixed one is ACKed; a shorter list unsubscribes.
func TestADSSecrets(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := xdstest.NewServer(t)
		const node = "node-s"
		ca, _ := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/ca")
		good := xdstest.CASecret("kubernetes://a", ca)
		bad := xdstest.CASecret("kubernetes://b", []byte("not a certificate"))
		unasked := xdstest.CASecret("kubernetes://unasked", ca)
		srv.Set(t, node, map[string][]types.Resource{
			resource.ClusterType: {xdstest.StaticCluster("s")},
			resource.SecretType:  {good, bad, unasked},
		})
		sink := &secretSink{got: map[string]*tlsv3.Secret{}, seen: map[string]bool{}}
		c := New(Config{Server: srv.Addr, Delta: delta, Node: &corev3.Node{Id: node},
			BackoffBase: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
			Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel)}, sink)
		c.WatchSecrets([]string{"kubernetes://b", "kubernetes://a"})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		defer func() { cancel(); <-done }()

		xdstest.Eventually(t, wait, "secret a stored", func() bool { return sink.get("kubernetes://a") != nil })
		if got := srv.Subscribed(resource.SecretType); !slices.Equal(got, []string{"kubernetes://a", "kubernetes://b"}) {
			t.Errorf("subscribed = %v, want exactly a and b", got)
		}
		xdstest.Eventually(t, wait, "b NACKed by name", func() bool {
			for _, n := range srv.NACKs() {
				if n.TypeURL == resource.SecretType && n.Message == `secret "kubernetes://b": validation_context.trusted_ca: no PEM certificate` {
					return true
				}
			}
			return false
		})
		if sink.handed("kubernetes://unasked") {
			t.Error("a secret not subscribed to was handed over")
		}
		if st := c.Stats(); st[StatCDSUpdateRejected] != 0 {
			t.Errorf("a secret's NACK counted as CDS's: %v", st)
		}

		srv.Set(t, node, map[string][]types.Resource{
			resource.ClusterType: {xdstest.StaticCluster("s")},
			resource.SecretType:  {good, xdstest.CASecret("kubernetes://b", ca)},
		})
		xdstest.Eventually(t, wait, "b stored once fixed", func() bool { return sink.get("kubernetes://b") != nil })
		xdstest.Eventually(t, wait, "the fixed secrets ACKed", func() bool { return srv.ACKs(resource.SecretType) > 0 })

		c.WatchSecrets([]string{"kubernetes://a"})
		xdstest.Eventually(t, wait, "b unsubscribed", func() bool {
			return slices.Equal(srv.Subscribed(resource.SecretType), []string{"kubernetes://a"})
		})
	})
}
