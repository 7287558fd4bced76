package tlsctx

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/mesh/secrets"
)

// TestConcurrentHandshakesDuringRotation: handshakes on many goroutines
// while both stores rotate default and ROOTCA (same CA, new versions) all
// succeed and are all counted; run with -race it checks the per-secret
// validation cache and the store reads.
func TestConcurrentHandshakesDuringRotation(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	var ust, dst Stats
	u := mustUp(t, cl.store, istioUp("sni", serverID), &ust)
	d := mustDown(t, sv.store, istioDown("h2", "http/1.1"), &dst)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	const workers, each = 4, 5
	leaves := []*testpki.Leaf{ca.Leaf(t, serverID, testpki.LeafOpts{}), ca.Leaf(t, clientID, testpki.LeafOpts{})}
	stop := make(chan struct{})
	rotated := make(chan struct{})
	go func() { // rotation; Put is safe from any goroutine
		defer close(rotated)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for _, p := range []struct {
				s   *secrets.Store
				sec *tlsv3.Secret
			}{{sv.store, leaves[0].Secret("default")}, {cl.store, ca.RootSecret("ROOTCA")}, {cl.store, leaves[1].Secret("default")}} {
				if err := p.s.Put(fmt.Sprint(i), p.sec, time.Now()); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	errs := make(chan error, 2*workers*each)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(2)
		go func() { // servers
			defer wg.Done()
			for i := 0; i < each; i++ {
				raw, err := ln.Accept()
				if err != nil {
					errs <- err
					return
				}
				c, err := d.Handshake(context.Background(), raw)
				if err == nil {
					err = exchange(c, 's')
					c.Close()
				}
				if err != nil {
					errs <- fmt.Errorf("server: %w", err)
				}
			}
		}()
		go func() { // clients
			defer wg.Done()
			for i := 0; i < each; i++ {
				raw, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					errs <- err
					return
				}
				c, err := u.Secure(context.Background(), raw, "h2")
				if err == nil {
					err = exchange(c.(*tls.Conn), 'c')
					c.Close()
				}
				if err != nil {
					errs <- fmt.Errorf("client: %w", err)
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-rotated
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	wantStats(t, "client", &ust, map[string]uint64{"handshake": workers * each, "connection_error": 0})
	wantStats(t, "server", &dst, map[string]uint64{"handshake": workers * each, "connection_error": 0})
}
