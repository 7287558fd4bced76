package tlsctx

import (
	"testing"

	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/testpki"
)

// benchHandshakes runs b.N mutual-TLS handshakes (ECDSA P-256 leaves,
// istiod's contexts) over loopback, each with one byte each way.
func benchHandshakes(b *testing.B, keys uint32, wantResumed bool) {
	ca := testpki.NewCA(b)
	cl, sv := newSide(b, ca, clientID), newSide(b, ca, serverID)
	uc := istioUp("sni", serverID)
	uc.MaxSessionKeys = wrapperspb.UInt32(keys)
	var st Stats
	u := mustUp(b, cl.store, uc, &st)
	d := mustDown(b, sv.store, istioDown("h2", "http/1.1"), nil)
	if r := handshake(b, u, "", d); r.clientErr != nil { // warm the session cache
		b.Fatal(r.clientErr)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r := handshake(b, u, "", d)
		if r.clientErr != nil || r.serverErr != nil {
			b.Fatalf("client %v, server %v", r.clientErr, r.serverErr)
		}
		r.close()
	}
	b.StopTimer()
	if got := stat(&st, "session_reused"); (got >= uint64(b.N)) != wantResumed {
		b.Fatalf("session_reused = %d after %d handshakes, want resumed %v", got, b.N, wantResumed)
	}
}

// BenchmarkHandshakeECDSA is a full handshake per connection.
func BenchmarkHandshakeECDSA(b *testing.B) { benchHandshakes(b, 0, false) }

// BenchmarkResumed resumes the previous session (Envoy's default of one
// session key per context).
func BenchmarkResumed(b *testing.B) { benchHandshakes(b, 1, true) }
