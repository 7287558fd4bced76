package httpconn

import (
	"io"
	"net/http"
	"net/netip"
	"testing"

	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestHopByHopNeverStripsProxyHeaders: a client that names the proxy's
// own headers in Connection (X-Forwarded-For, X-Envoy-External-Address,
// X-Forwarded-Proto, X-Request-Id) cannot make them vanish upstream, as
// it could when Connection-named headers were stripped after the proxy
// set them (the bug class of Traefik CVE-2024-45410); a header of the
// client's own that Connection names is still removed, and so is
// Connection itself.
func TestHopByHopNeverStripsProxyHeaders(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.UseRemoteAddress = wrapperspb.Bool(true)
	cfg := mustParse(t, h)
	c := rawConn(t, cfg, env, netip.MustParseAddrPort("203.0.113.7:4000"))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n"+
		"Connection: keep-alive, X-Forwarded-For, X-Envoy-External-Address, X-Forwarded-Proto, X-Request-Id, X-Mine\r\n"+
		"X-Mine: gone\r\n\r\n")
	rs := readResponses(t, c, 1)
	if len(rs) != 1 || rs[0].StatusCode != http.StatusOK {
		t.Fatalf("responses %v, want one 200", rs)
	}
	got := rs[0].Header
	for k, want := range map[string]string{
		"X-Seen-X-Forwarded-For":          "203.0.113.7",
		"X-Seen-X-Envoy-External-Address": "203.0.113.7",
		"X-Seen-X-Forwarded-Proto":        "http",
	} {
		if v := got.Get(k); v != want {
			t.Errorf("upstream saw %s = %q, want %q", k[len("X-Seen-"):], v, want)
		}
	}
	if v := got.Get("X-Seen-X-Request-Id"); len(v) != 36 {
		t.Errorf("upstream saw X-Request-Id %q, want a generated UUID", v)
	}
	for _, k := range []string{"X-Seen-X-Mine", "X-Seen-Connection"} {
		if v, ok := got[k]; ok {
			t.Errorf("upstream saw %s = %q, want it stripped", k[len("X-Seen-"):], v)
		}
	}
}
