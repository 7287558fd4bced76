package proxy

import (
	"net/http"
	"strings"
	"testing"
)

// TestAdminRefusesBrowserPages: a web page in the laptop's browser can
// neither make the proxy exit with a cross-origin form POST to
// /quitquitquit nor read /config_dump through a rebound DNS name; curl-like
// clients are unaffected (issue 15, item 10).
func TestAdminRefusesBrowserPages(t *testing.T) {
	doc := bootstrapDoc("node", freeAddr(t), "GRPC")
	delete(doc, "dynamic_resources")
	p, _ := startProxy(t, doc)
	a := newAdminClient(t, p)

	req, _ := http.NewRequest(http.MethodPost, a.base+"/quitquitquit", strings.NewReader(""))
	req.Header.Set("Origin", "http://evil.example")
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	resp, err := a.c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("cross-origin POST /quitquitquit: %d, want 403", resp.StatusCode)
	}
	select {
	case why := <-p.quit:
		t.Fatalf("the proxy was asked to quit (%s) by a cross-origin request", why)
	default:
	}

	req, _ = http.NewRequest(http.MethodGet, a.base+"/config_dump", nil)
	req.Host = "rebound.evil.example:15000"
	resp, err = a.c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("/config_dump with Host rebound.evil.example: %d, want 403", resp.StatusCode)
	}
	if code, body := a.get(t, "/config_dump"); code != http.StatusOK || !strings.Contains(body, "BootstrapConfigDump") {
		t.Fatalf("/config_dump from a loopback client: %d %.80q", code, body)
	}
}
