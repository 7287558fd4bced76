package tlsctx

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// FuzzParse: any encoded TLS context either compiles or is refused with an
// error; nothing panics (the bytes come from a control plane).
func FuzzParse(f *testing.F) {
	for _, m := range []proto.Message{istioUp("sni", serverID), istioDown("istio-peer-exchange", "h2", "http/1.1")} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	store := newStore(f)
	f.Fuzz(func(t *testing.T, b []byte, down bool) {
		var err error
		if down {
			ts := &corev3.TransportSocket{Name: tlsSocketName, ConfigType: &corev3.TransportSocket_TypedConfig{
				TypedConfig: &anypb.Any{TypeUrl: downType, Value: b}}}
			var d *Downstream
			d, err = ParseDownstream("f", ts, store, nil)
			if err == nil && d == nil {
				t.Fatal("nil Downstream without an error")
			}
		} else {
			ts := &corev3.TransportSocket{Name: tlsSocketName, ConfigType: &corev3.TransportSocket_TypedConfig{
				TypedConfig: &anypb.Any{TypeUrl: upstreamType, Value: b}}}
			var u *Upstream
			u, err = ParseUpstream("f", ts, store, nil)
			if err == nil && u == nil {
				t.Fatal("nil Upstream without an error")
			}
		}
		if err != nil && err.Error()[:1] != "f" {
			t.Fatalf("error %q does not start with the field", err)
		}
	})
}
