package cluster

import (
	"fmt"
	"net/netip"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// dedupe keeps the first of repeated addresses, in order, for short lists
// (checked pairwise) and long ones (through a map), and hands back the
// list itself, not a copy, when nothing repeats.
func TestDedupe(t *testing.T) {
	spec := func(i int) hostSpec {
		return hostSpec{addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i / 250), byte(i%250 + 1)}), 8080)}
	}
	for _, n := range []int{1, 3, dedupeScan, dedupeScan + 1, 100} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var in []hostSpec
			for i := range n {
				in = append(in, spec(i))
			}
			out := dedupe(in)
			if len(out) != n || &out[0] != &in[0] {
				t.Fatalf("no repeats: got %d specs (copied: %v), want the %d given, not copied", len(out), &out[0] != &in[0], n)
			}
			// Repeat the first and the last address, the repeat carrying
			// other metadata: the first occurrence wins.
			first, last := spec(0), spec(n-1)
			first.pipe, last.pipe = "", ""
			first.meta, last.meta = &hostMeta{}, &hostMeta{}
			withDups := append(append([]hostSpec(nil), in...), first, last)
			out = dedupe(withDups)
			if len(out) != n {
				t.Fatalf("with 2 repeats: got %d specs, want %d", len(out), n)
			}
			for i := range out {
				if out[i].key() != in[i].key() || out[i].meta != in[i].meta {
					t.Fatalf("spec %d: got %v, want the first occurrence %v", i, out[i].key(), in[i].key())
				}
			}
		})
	}
	pipes := []hostSpec{{pipe: "/a"}, {pipe: "/b"}, {pipe: "/a"}}
	if out := dedupe(pipes); len(out) != 2 || out[0].pipe != "/a" || out[1].pipe != "/b" {
		t.Fatalf("pipes: got %v, want /a, /b", out)
	}
}

// Endpoints of an assignment with the same metadata share one hostMeta;
// one that differs (here its weight) gets its own, with its own value.
func TestParseAssignmentSharesMeta(t *testing.T) {
	ep := func(ip string, weight uint32) *endpointv3.LbEndpoint {
		e := &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080}}}}}}}
		if weight != 0 {
			e.LoadBalancingWeight = wrapperspb.UInt32(weight)
		}
		return e
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{{
		Locality:    &corev3.Locality{Zone: "z1"},
		LbEndpoints: []*endpointv3.LbEndpoint{ep("10.0.0.1", 0), ep("10.0.0.2", 0), ep("10.0.0.3", 5), ep("10.0.0.4", 0)},
	}}}
	eps, err := parseAssignment(cla, "load_assignment", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 4 {
		t.Fatalf("%d endpoints, want 4", len(eps))
	}
	if eps[0].meta != eps[1].meta {
		t.Error("endpoints 0 and 1 have the same metadata but two copies of it")
	}
	if eps[2].meta == eps[1].meta || eps[2].meta.weight != 5 || eps[1].meta.weight != 1 {
		t.Errorf("endpoint 2 (weight 5) shares or mixes metadata: weights %d, %d", eps[1].meta.weight, eps[2].meta.weight)
	}
	for i, e := range eps {
		if e.meta.zone != "z1" {
			t.Errorf("endpoint %d: zone %q, want z1", i, e.meta.zone)
		}
	}
}
