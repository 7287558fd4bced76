package httpconn

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestCanonicalPath: Envoy's PathUtilityTest cases (path_utility_test.cc:
// AlreadyNormalPaths, InvalidPaths, NormalizeValidPaths,
// NormalizeCasePath), applied to the whole target as the connection
// manager does (the query is left alone).
func TestCanonicalPath(t *testing.T) {
	pn := pathNorm{normalize: true}
	for _, p := range []string{"/xyz", "/x/y/z", "/", "/a.b/c..d/...", "/.well-known/x", "/a%20b", "/%2F%2f", "/a;b=c"} {
		if got, act := pn.apply(p); got != p || act != pathContinue {
			t.Errorf("normal %q: %q %v", p, got, act)
		}
	}
	for _, p := range []string{"/xyz/.%00../abc", "/xyz/%00.%00./abc", "/xyz/AAAAA%%0000/abc", "/a#frag"} {
		if _, act := pn.apply(p); act != pathReject {
			t.Errorf("invalid %q: action %v, want reject", p, act)
		}
	}
	for _, tc := range [][2]string{
		{"/a/b/../c", "/a/c"},
		{"/a/b/./c", "/a/b/c"},
		{"/a/b/../../../../c", "/c"},
		{"/a/..\\c", "/c"},
		{"/%c0%af", "/%c0%af"},
		{"/%5c%25", "/%5c%25"},
		{"/a/b/%2E%2E/c", "/a/c"},
		{"/a/b/%2e%2e/c", "/a/c"},
		{"/a/b/%2E./c", "/a/c"},
		{"/a/b/%2E/c", "/a/b/c"},
		{"/../a/b", "/a/b"},
		{"/./a/b", "/a/b"},
		{"/A/B/C", "/A/B/C"},
		{"/a/%2F%2f/c", "/a/%2F%2f/c"},
		{"/xyz/..;foo=bar/abc", "/abc"},
		{"/..;foo=bar/abc", "/abc"},
		{"/xyz/..;foo=bar", "/"},
		{"/xyz/.;foo=bar/abc", "/xyz/abc"},
		{"/.;foo=bar/abc", "/abc"},
		{"/xyz/.;foo=bar", "/xyz/"},
		{"/xyz/..;foo=bar/.;v1=2,v2=3/abc", "/abc"},
		{"/..;foo=bar/abc/.;mmm", "/abc/"},
		{"/.;aaa/..;foo=bar/abc/.;mmm", "/abc/"},
		{"/xyz/..;foo=bar/.;fff=zzz", "/"},
		{"/xyz/..;foo=bar/.;fff=zzz?blah=woops", "/?blah=woops"},
		{"/xyz/..;foo=bar/.;fff=zzz/remain;blah-bluh?query", "/remain;blah-bluh?query"},
		// Unreserved characters are decoded, others escaped as Chromium does.
		{"/%61%62%7E%2d", "/ab~-"},
		{"/a b\"<>^`{|}\x7f\xc3\xa9", "/a%20b%22%3C%3E%5E%60%7B%7C%7D%7F%C3%A9"},
		{"/public/../admin?x=/../y", "/admin?x=/../y"},
		// Found by FuzzCanonicalPath. Parameters on a dot segment whose
		// dots are encoded, or that follows a backslash, go with it:
		// "/public/..;x/admin" would reach a server that ignores ";x" as
		// "/admin" after routing as "/public/...".
		{"/public/%2e%2e;x/admin", "/admin"},
		{"/public/.%2E;x/admin", "/admin"},
		{"/public\\..;x\\admin", "/admin"},
		{"/public/%2e;x/admin", "/public/admin"},
		{"/public/%2e%2e;x", "/"},
		// A '%' that decoding makes an escape is itself escaped: "%%32e"
		// is not "%2e", which a second decoding would make a dot.
		{"/public/%%32e%%32e/admin", "/public/%252e%252e/admin"},
		{"/%%414", "/%25A4"},
		{"/%%41", "/%A"},
		{"/a%/../%%32e", "/%252e"},
		{"/100%", "/100%"},
	} {
		got, act := pn.apply(tc[0])
		if got != tc[1] || act != pathContinue {
			t.Errorf("%q: %q %v, want %q", tc[0], got, act, tc[1])
		}
	}
}

// TestMergeSlashes: Envoy's PathUtilityTest.MergeSlashes (absolute paths;
// relative ones never reach the connection manager).
func TestMergeSlashes(t *testing.T) {
	pn := pathNorm{mergeSlashes: true}
	for _, tc := range [][2]string{
		{"/a//b/c/", "/a/b/c/"},
		{"/a", "/a"},
		{"//a/b/c", "/a/b/c"},
		{"/a//b/c", "/a/b/c"},
		{"/a/b/c//", "/a/b/c/"},
		{"/a///b/c", "/a/b/c"},
		{"/a////b/c", "/a/b/c"},
		{"/a//b?a=///c", "/a/b?a=///c"},
		{"/a//b?", "/a/b?"},
		{"//a/?b", "/a/?b"},
		// Found by FuzzCanonicalPath: slashes only merge to one.
		{"//", "/"},
		{"///?a", "/?a"},
	} {
		if got, _ := pn.apply(tc[0]); got != tc[1] {
			t.Errorf("%q: %q, want %q", tc[0], got, tc[1])
		}
	}
	// merge_slashes runs after normalize_path: "/a/.//b" is "/a//b" once
	// the dot segment is gone.
	pn.normalize = true
	if got, _ := pn.apply("/a/.//b"); got != "/a/b" {
		t.Errorf("normalize+merge: %q", got)
	}
}

// TestEscapedSlashes: path_with_escaped_slashes_action on Envoy's
// PathUtilityTest.UnescapeSlashes inputs and the four actions.
func TestEscapedSlashes(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		found    bool
	}{
		{"/a%2Fb%2fc/", "/a/b/c/", true},
		{"/%2b", "/%2b", false},
		{"/a/b/c", "/a/b/c", false},
		{"/abc%2", "/abc%2", false},
		{"/foo%", "/foo%", false},
		{"/a%2F", "/a/", true},
		{"/%%2fa/", "/%/a/", true},
		{"/%2%2fa/", "/%2/a/", true},
		{"/a%5Cb%5cc/", "/a\\b\\c/", true},
		{"/x/%2E%2e/z%2f%2Fabc%5C../def", "/x/%2E%2e/z//abc\\../def", true},
	} {
		got, found := unescapeSlashes(tc.in)
		if got != tc.want || found != tc.found {
			t.Errorf("unescapeSlashes(%q) = %q %v, want %q %v", tc.in, got, found, tc.want, tc.found)
		}
	}
	const in = "/a%2Fb%5C..%2f/c?q=%2F"
	for _, tc := range []struct {
		action hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction
		want   string
		act    pathAction
	}{
		{hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT, "/a%2Fb%5C..%2f/c?q=%2F", pathContinue},
		{hcmv3.HttpConnectionManager_KEEP_UNCHANGED, "/a%2Fb%5C..%2f/c?q=%2F", pathContinue},
		{hcmv3.HttpConnectionManager_REJECT_REQUEST, in, pathReject},
		// Unescaped before normalization: "/a/b\../" is "/a/" then.
		{hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD, "/a/c?q=%2F", pathContinue},
		{hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT, "/a/c?q=%2F", pathRedirect},
	} {
		pn := pathNorm{normalize: true, mergeSlashes: true, escapedSlashes: tc.action}
		got, act := pn.apply(in)
		if act != tc.act || (act != pathReject && got != tc.want) {
			t.Errorf("%s: %q %v, want %q %v", tc.action, got, act, tc.want, tc.act)
		}
	}
}

// TestNormalPathNoAlloc: an already normal path costs no allocation.
func TestNormalPathNoAlloc(t *testing.T) {
	pn := pathNorm{normalize: true, mergeSlashes: true, escapedSlashes: hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT}
	for _, p := range []string{"/api/v1/items/42?x=1&y=/../z", "/index.html", "/a%20b/c"} {
		if n := testing.AllocsPerRun(100, func() { pn.apply(p) }); n != 0 {
			t.Errorf("%q: %v allocations", p, n)
		}
	}
}

// TestPathNormalizationRouting: through the engine, normalize_path stops
// "/public/../admin" from matching the /public prefix and forwards the
// normalized path; without it the path goes as sent (Envoy's default);
// a failing path gets 400 and UNESCAPE_AND_REDIRECT a 307.
func TestPathNormalizationRouting(t *testing.T) {
	pub, adm := startUpstream(t, named("public")), startUpstream(t, named("admin"))
	env := newEnv(t, xdstest.StaticCluster("public", pub.addr), xdstest.StaticCluster("admin", adm.addr))
	rc := routeConfig(vhost("v", []string{"*"}, prefixRoute("/public", "public"), prefixRoute("/", "admin")))

	raw := func(p *proxy, target string) *http.Response {
		t.Helper()
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET "+target+" HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}

	off := startProxy(t, mustParse(t, hcm(rc)), env)
	if resp := raw(off, "/public/../admin"); resp.Header.Get("X-Upstream") != "public" || resp.Header.Get("X-Seen-Path") != "/public/../admin" {
		t.Errorf("normalize_path unset: %s seen %q, want public with the path as sent", resp.Header.Get("X-Upstream"), resp.Header.Get("X-Seen-Path"))
	}

	h := hcm(rc)
	h.NormalizePath = wrapperspb.Bool(true)
	h.MergeSlashes = true
	h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT
	cfg := mustParse(t, h)
	on := startProxy(t, cfg, env)
	for _, tc := range []struct{ target, upstream, seen string }{
		{"/public/../admin", "admin", "/admin"},
		{"/public/%2e%2e/admin?q=1", "admin", "/admin?q=1"},
		{"/public/..;x=y/admin", "admin", "/admin"},
		{"/public/./a//b", "public", "/public/a/b"},
		{"//public/x", "public", "/public/x"},
	} {
		resp := raw(on, tc.target)
		if resp.StatusCode != 200 || resp.Header.Get("X-Upstream") != tc.upstream || resp.Header.Get("X-Seen-Path") != tc.seen {
			t.Errorf("%s: %d %s seen %q, want %s seen %q", tc.target, resp.StatusCode, resp.Header.Get("X-Upstream"), resp.Header.Get("X-Seen-Path"), tc.upstream, tc.seen)
		}
	}
	logged := map[string]bool{}
	for _, e := range on.waitEntries(t, 5) {
		logged[e.Path] = true
	}
	if !logged["/public/x"] || logged["//public/x"] || logged["/public/../admin"] {
		t.Errorf("access log paths %v, want the normalized ones", logged)
	}

	for _, target := range []string{"/a/%00/b", "/a#b"} {
		resp := raw(on, target)
		if resp.StatusCode != 400 {
			t.Errorf("%s: %d, want 400", target, resp.StatusCode)
		}
	}
	if v := cfg.Stats().FailedPathNormalization.Load(); v != 2 {
		t.Errorf("downstream_rq_failed_path_normalization = %d, want 2", v)
	}

	resp := raw(on, "/public%2F..%2Fadmin?q")
	if resp.StatusCode != 307 || resp.Header.Get("Location") != "/admin?q" {
		t.Errorf("escaped slashes: %d Location %q, want 307 /admin?q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if v := cfg.Stats().RedirectedWithNormalizedPath.Load(); v != 1 {
		t.Errorf("downstream_rq_redirected_with_normalized_path = %d", v)
	}
	if adm.requests.Load()+pub.requests.Load() != 6 {
		t.Errorf("upstream requests %d, want 6 (rejected and redirected ones not forwarded)", adm.requests.Load()+pub.requests.Load())
	}

	h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_REJECT_REQUEST
	rej := startProxy(t, mustParse(t, h), env)
	if resp := raw(rej, "/public%2fx"); resp.StatusCode != 400 {
		t.Errorf("REJECT_REQUEST: %d, want 400", resp.StatusCode)
	}

	h.PathWithEscapedSlashesAction = 99
	if _, err := ParseHCM(h); err == nil || !strings.Contains(err.Error(), "path_with_escaped_slashes_action") || !strings.Contains(err.Error(), "valid: KEEP_UNCHANGED") {
		t.Errorf("unknown action: %v", err)
	}
}
