package xdsclient

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"unsafe"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// Responses that cannot be decoded are rejected with an error naming the resource.
func TestDecodeErrorsNameTheResource(t *testing.T) {
	good := xdstest.MustAny(t, xdstest.TCPListener(t, "l1", "0.0.0.0", 8001, "c", true))
	cases := []struct {
		name string
		r    response
		want string
	}{
		{"garbage", response{kind: kindListener, delta: true, resources: []rawResource{
			{name: "l1", any: &anypb.Any{TypeUrl: ListenerType, Value: []byte{0xff, 0xff, 0xff}}},
		}}, `listener "l1": decoding`},
		{"name mismatch", response{kind: kindListener, delta: true, resources: []rawResource{
			{name: "l9", any: good},
		}}, `listener "l9": resource name mismatch: the resource is named "l1"`},
		{"wrong type", response{kind: kindCluster, resources: []rawResource{{any: good}}},
			`cluster resources[0]: type "` + ListenerType + `"`},
		{"duplicate", response{kind: kindListener, resources: []rawResource{{any: good}, {any: good}}},
			`listener "l1": duplicate`},
		{"wrapper name mismatch", response{kind: kindRoute, delta: true, resources: []rawResource{
			{name: "r1", any: xdstest.MustAny(t, &discoveryv3.Resource{Name: "r2", Resource: xdstest.MustAny(t, xdstest.RouteConfig("r2", "c"))})},
		}}, `route_configuration "r1": resource name mismatch: the Resource wrapper is named "r2"`},
		{"invalid", response{kind: kindListener, resources: []rawResource{{any: xdstest.MustAny(t, &listenerv3.Listener{Name: "l2", ListenerFilters: []*listenerv3.ListenerFilter{{}}})}}},
			`listener "l2": invalid`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decode(&tc.r)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestListenerRefs(t *testing.T) {
	l := xdstest.HTTPListener(t, "l", "0.0.0.0", 80, "r1", true)
	l.FilterChains = append(l.FilterChains, xdstest.HTTPListener(t, "x", "0.0.0.0", 80, "r0", true).FilterChains[0], xdstest.TCPListener(t, "y", "0.0.0.0", 80, "c", true).FilterChains[0])
	l.DefaultFilterChain = xdstest.HTTPListener(t, "z", "0.0.0.0", 80, "r1", true).FilterChains[0]
	refs, err := listenerRefs(l)
	if err != nil || !slices.Equal(refs, []string{"r0", "r1"}) {
		t.Errorf("listenerRefs = %v, %v", refs, err)
	}
}

// FuzzDecode feeds arbitrary bytes to decode as the one resource of a response of
// each type, bare, inside a discovery Resource wrapper, or as the wrapper itself.
// decode must not panic; it returns the resource under the name it carries, or an
// error that starts with the type's noun and names the resource when its name is
// known (the text a NACK carries).
func FuzzDecode(f *testing.F) {
	seed := func(k kind, delta bool, shape uint8, name string, m proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(k), delta, shape, name, b)
	}
	ep := netip.MustParseAddrPort("10.0.0.1:80")
	seed(kindCluster, false, 0, "", xdstest.EDSCluster("outbound|80||a"))
	seed(kindCluster, true, 0, "s", xdstest.StaticCluster("s", ep))
	seed(kindEndpoint, true, 0, "outbound|80||a", xdstest.Assignment("outbound|80||a", ep))
	seed(kindListener, false, 1, "l", xdstest.HTTPListener(f, "l", "0.0.0.0", 80, "r", false))
	seed(kindListener, true, 0, "t", xdstest.TCPListener(f, "t", "10.0.0.1", 80, "c", true))
	seed(kindRoute, true, 1, "r", xdstest.RouteConfig("r", "c"))
	seed(kindRoute, false, 2, "", &discoveryv3.Resource{Name: "r", Resource: xdstest.MustAny(f, xdstest.RouteConfig("r", "c"))})
	f.Add(uint8(kindListener), true, uint8(0), "l", []byte{0x0a, 0xff})

	f.Fuzz(func(t *testing.T, k uint8, delta bool, shape uint8, name string, value []byte) {
		kd := kind(k % uint8(numKinds))
		info := &kinds[kd]
		a := &anypb.Any{TypeUrl: info.url, Value: value}
		switch shape % 3 {
		case 1: // a SotW response may wrap each resource
			// proto3 strings are UTF-8: no server can send another wrapper name.
			b, err := proto.Marshal(&discoveryv3.Resource{Name: strings.ToValidUTF8(name, "?"), Resource: a})
			if err != nil {
				t.Fatal(err)
			}
			a = &anypb.Any{TypeUrl: resourceWrapperType, Value: b}
		case 2: // the bytes are the wrapper
			a = &anypb.Any{TypeUrl: resourceWrapperType, Value: value}
		}
		raw := rawResource{any: a}
		if delta {
			raw.name = name
		}
		got, err := decode(&response{kind: kd, delta: delta, resources: []rawResource{raw}})
		if err != nil {
			msg := err.Error()
			named, unnamed := strings.HasPrefix(msg, info.noun+` "`), strings.HasPrefix(msg, info.noun+" resources[0]: ")
			if !named && !unnamed || raw.name != "" && !named {
				t.Fatalf("error %q does not name the %s (server name %q)", msg, info.noun, raw.name)
			}
			return
		}
		if len(got) != 1 || got[0].name == "" {
			t.Fatalf("decoded %+v, want one named resource", got)
		}
		e := got[0]
		if raw.name != "" && e.name != raw.name {
			t.Fatalf("decoded as %q, the server named it %q", e.name, raw.name)
		}
		if e.entry != nil && info.name(e.entry.msg) != e.name {
			t.Fatalf("entry %q holds a resource named %q", e.name, info.name(e.entry.msg))
		}
	})
}

// A large response is decoded on several goroutines and comes out as the
// sequential decoding did: every resource in the response's order, and
// of several bad ones, the first in that order named.
func TestDecodeLargeResponseInParallel(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	const n = 3 * LargeResponse
	raws := make([]rawResource, n)
	for i := range raws {
		raws[i] = rawResource{any: xdstest.MustAny(t, xdstest.EDSCluster(fmt.Sprintf("c%05d", i)))}
	}
	out, err := decode(&response{kind: kindCluster, resources: raws})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != n {
		t.Fatalf("%d entries, want %d", len(out), n)
	}
	for i, e := range out {
		if want := fmt.Sprintf("c%05d", i); e.name != want || e.entry.msg.(*clusterv3.Cluster).GetName() != want || !slices.Equal(e.entry.refs, []string{want}) {
			t.Fatalf("entry %d is %q (refs %v), want %q", i, e.name, e.entry.refs, want)
		}
	}

	// A duplicate early in the response, garbage later (decoded by another
	// goroutine first, perhaps): the duplicate is the error.
	bad := slices.Clone(raws)
	bad[n-10] = rawResource{any: &anypb.Any{TypeUrl: ClusterType, Value: []byte{0xff, 0xff}}}
	bad[7] = raws[3]
	if _, err := decode(&response{kind: kindCluster, resources: bad}); err == nil || !strings.Contains(err.Error(), `cluster "c00003": duplicate`) {
		t.Fatalf("err = %v, want the duplicate c00003 (the first problem in order)", err)
	}
	bad[7] = raws[7]
	if _, err := decode(&response{kind: kindCluster, resources: bad}); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("cluster resources[%d]: decoding", n-10)) {
		t.Fatalf("err = %v, want resources[%d] named", err, n-10)
	}
}

// Decoded listeners share one copy of their filters' names and type URLs,
// and decoded assignments one copy of an endpoint address they repeat; the
// messages stay equal to what was sent.
func TestDecodeInternsRepeatedStrings(t *testing.T) {
	var raws []rawResource
	var sent []proto.Message
	for i := range 2 {
		l := xdstest.TCPListener(t, fmt.Sprintf("l%d", i), "0.0.0.0", uint32(8000+i), "c", true)
		sent = append(sent, l)
		raws = append(raws, rawResource{any: xdstest.MustAny(t, l)})
	}
	out, err := decode(&response{kind: kindListener, resources: raws})
	if err != nil {
		t.Fatal(err)
	}
	same := func(a, b string) bool { return a == b && unsafe.StringData(a) == unsafe.StringData(b) }
	f0 := out[0].entry.msg.(*listenerv3.Listener).GetFilterChains()[0].GetFilters()[0]
	f1 := out[1].entry.msg.(*listenerv3.Listener).GetFilterChains()[0].GetFilters()[0]
	if !same(f0.GetName(), f1.GetName()) || !same(f0.GetTypedConfig().GetTypeUrl(), f1.GetTypedConfig().GetTypeUrl()) {
		t.Errorf("filter name %q and type URL %q are held twice", f0.GetName(), f0.GetTypedConfig().GetTypeUrl())
	}
	for i, d := range out {
		if !proto.Equal(d.entry.msg, sent[i]) {
			t.Errorf("listener %d changed by decoding", i)
		}
	}

	raws = nil
	for _, name := range []string{"a", "b"} {
		raws = append(raws, rawResource{any: xdstest.MustAny(t, xdstest.AssignmentOf(name, xdstest.EndpointsAt(netip.MustParseAddrPort("10.1.2.3:80"))...))})
	}
	if out, err = decode(&response{kind: kindEndpoint, resources: raws}); err != nil {
		t.Fatal(err)
	}
	addr := func(i int) string {
		return out[i].entry.msg.(*endpointv3.ClusterLoadAssignment).GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
	}
	if !same(addr(0), addr(1)) || addr(0) != "10.1.2.3" {
		t.Errorf("endpoint address %q held twice", addr(0))
	}
}
