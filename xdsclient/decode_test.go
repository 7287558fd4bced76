package xdsclient

import (
	"slices"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// Responses that cannot be decoded are rejected with an error naming the resource.
func TestDecodeErrorsNameTheResource(t *testing.T) {
	good := mustAny(t, tcpListener(t, "l1", 8001, "c"))
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
		{"invalid", response{kind: kindListener, resources: []rawResource{{any: mustAny(t, &listenerv3.Listener{Name: "l2", ListenerFilters: []*listenerv3.ListenerFilter{{}}})}}},
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
	l := httpListener(t, "l", 80, "r1")
	l.FilterChains = append(l.FilterChains, httpListener(t, "x", 80, "r0").FilterChains[0], tcpListener(t, "y", 80, "c").FilterChains[0])
	l.DefaultFilterChain = httpListener(t, "z", 80, "r1").FilterChains[0]
	refs, err := listenerRefs(l)
	if err != nil || !slices.Equal(refs, []string{"r0", "r1"}) {
		t.Errorf("listenerRefs = %v, %v", refs, err)
	}
}
