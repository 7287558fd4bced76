package mesh

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshtun/meshtun/internal/testpki"
)

// allowPrincipal is istiod's ALLOW policy for one source principal
// (source.principals: ["cluster.local/ns/default/sa/sleep"]).
func allowPrincipal(id string) *rbacv3.RBAC {
	return &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"ns[default]-policy[allow-sleep]-rule[0]": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{
			Rules: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}}}}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: []*rbacv3.Principal{
			{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: []*rbacv3.Principal{
				{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
					PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}}}}}}}}}}}}}},
	}}}
}

// withRBAC puts istiod's RBAC filters on every chain of virtualInbound:
// the network filter before tcp_proxy, the HTTP one before the router.
func withRBAC(t *testing.T, rules *rbacv3.RBAC) func(*listenerv3.Listener) {
	return func(vi *listenerv3.Listener) {
		for _, fc := range vi.GetFilterChains() {
			fs := fc.GetFilters()
			last := fs[len(fs)-1]
			if last.GetName() != HCMFilter {
				fc.Filters = append(append(fs[:len(fs)-1:len(fs)-1], &listenerv3.Filter{Name: "envoy.filters.network.rbac",
					ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: anyOf(t, &netrbacv3.RBAC{StatPrefix: "tcp.", Rules: rules})}}), last)
				continue
			}
			var h hcmv3.HttpConnectionManager
			if err := last.GetTypedConfig().UnmarshalTo(&h); err != nil {
				t.Fatal(err)
			}
			hf := h.HttpFilters
			h.HttpFilters = append(append(hf[:len(hf)-1:len(hf)-1], &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac",
				ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, &httprbacv3.RBAC{Rules: rules})}}), hf[len(hf)-1])
			last.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: anyOf(t, &h)}
		}
	}
}

// TestInboundRBACPrincipals: istiod's STRICT virtualInbound with an
// ALLOW policy for sleep's SPIFFE ID: over mTLS, sleep's connections and
// requests pass; another workload of the same CA (other service
// account) is refused: its TCP connection closed with nothing reaching
// the app, its HTTP request answered 403.
func TestInboundRBACPrincipals(t *testing.T) {
	in := newInboundWith(t, true, false, withRBAC(t, allowPrincipal(sleepID)))
	intruder := in.ca.Leaf(t, "spiffe://cluster.local/ns/default/sa/intruder", testpki.LeafOpts{})
	app := startRecorder(t)

	t.Run("TCP", func(t *testing.T) {
		c, done := in.flow(t, app.addr)
		tc := tls.Client(c, in.meshClient(in.sleep, "istio"))
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		echoOver(t, tc, "ping")
		tc.Close()
		entryOf(t, done)

		c, done = in.flow(t, app.addr)
		tc = tls.Client(c, in.meshClient(intruder, "istio"))
		if err := tc.Handshake(); err != nil {
			t.Fatal(err) // the handshake is TLS's; RBAC decides after it
		}
		tc.Write([]byte("secret"))
		if n, err := io.ReadAll(tc); len(n) != 0 {
			t.Fatalf("the intruder read %q (%v)", n, err)
		}
		tc.Close()
		e := entryOf(t, done)
		if e.Details != "rbac_access_denied_matched_policy[none]" || e.DownstreamPeerURISAN != "spiffe://cluster.local/ns/default/sa/intruder" {
			t.Errorf("entry %+v", e)
		}
		if n := app.accepts.Load(); n != 1 {
			t.Errorf("the app accepted %d connections, want 1 (sleep's)", n)
		}
	})

	t.Run("HTTP", func(t *testing.T) {
		srv := startHTTPApp(t, func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "app") })
		get := func(cert *testpki.Leaf) (int, string) {
			tr := &http.Transport{DisableKeepAlives: true, Protocols: new(http.Protocols)}
			tr.Protocols.SetHTTP1(true)
			var dialed <-chan struct{}
			tr.DialTLSContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
				c, done := in.flow(t, srv)
				ch := make(chan struct{})
				go func() { <-done; close(ch) }()
				dialed = ch
				tl := tls.Client(c, in.meshClient(cert, "istio-http/1.1", "istio", "http/1.1"))
				return tl, tl.HandshakeContext(ctx)
			}
			resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://app.default.svc.cluster.local:8080/")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.CloseIdleConnections()
			<-dialed
			return resp.StatusCode, string(b)
		}
		if code, body := get(in.sleep); code != 200 || body != "app" {
			t.Errorf("sleep: %d %q", code, body)
		}
		if code, body := get(intruder); code != 403 || !strings.HasPrefix(body, "RBAC: access denied") {
			t.Errorf("intruder: %d %q", code, body)
		}
	})
}
