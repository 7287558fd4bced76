package httpconn

import (
	"strings"
	"testing"
	"unsafe"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// FuzzCanonicalPath checks the connection manager's path handling
// (pathNorm.apply: escaped slashes, normalize_path, merge_slashes) under
// every combination of its options. What routes match and what the
// upstream receives must be a fixed point: if a second pass could still
// change the path, a server behind the proxy that decodes or normalizes
// once more sees a path the routes never matched (the class of bypass
// behind GHSA-2w8w-rfw7-8gg4). The seeds run in every `go test`.
func FuzzCanonicalPath(f *testing.F) {
	for _, s := range []string{
		"/", "/a/b/c", "/a.b/c..d/...", "/.well-known/x", "/a%20b",
		"/a/b/../c", "/a/./b", "/a/b/../../../../c", "/a/..\\c", "\\..\\a",
		"/a/b/%2E%2E/c", "/a/b/%2e./c", "/a/b/.%2E", "/a/%2F%2f/c", "/a/%5C/c",
		"/xyz/..;foo=bar/abc", "/.;a/..;b/c/.;d", "/a//b///c/", "//a", "/a/b//",
		"/%61%62%7E%2d", "/%c0%af", "/%%32e%%32e/admin", "/a/%2e%2e;x/b",
		"/100%", "/%", "/%2", "/%zz", "/a b", "/\x7f\xff", "/a?b=../c#d", "*",
		"/a?x=%2F", "/x/.%00./y", "/%2e%2e%2f..", "/a/..//../b", "//", "///?x",
	} {
		for opts := range uint8(16) {
			f.Add(s, opts)
		}
	}
	f.Fuzz(func(t *testing.T, target string, opts uint8) {
		pn := pathNormFor(opts)
		got, action := pn.apply(target)
		if action == pathReject {
			return
		}
		if strings.IndexByte(target, '#') >= 0 {
			t.Fatalf("%+v: %q with a fragment was not rejected", pn, target)
		}
		if target == "" || target[0] != '/' {
			if got != target || action != pathContinue {
				t.Fatalf("%+v: %q (no origin-form path) became %q, %v", pn, target, got, action)
			}
			return
		}
		path, query, _ := strings.Cut(got, "?")
		if _, q, _ := strings.Cut(target, "?"); q != query {
			t.Fatalf("%+v: %q: query %q changed to %q", pn, target, q, query)
		}
		if pn.normalize {
			if path == "" || path[0] != '/' {
				t.Fatalf("%+v: %q: normalized path %q does not start with '/'", pn, target, path)
			}
			if seg, ok := dotSegment(path); ok {
				t.Fatalf("%+v: %q: normalized path %q keeps dot segment %q", pn, target, path, seg)
			}
		}
		if pn.mergeSlashes && strings.Contains(path, "//") {
			t.Fatalf("%+v: %q: merged path %q keeps \"//\"", pn, target, path)
		}
		if pn.escapedSlashes == hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD ||
			pn.escapedSlashes == hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT {
			if _, found := unescapeSlashes(path); found {
				t.Fatalf("%+v: %q: unescaped path %q keeps an escaped slash", pn, target, path)
			}
		}
		// Idempotent: the result needs no change; a redirect's target is
		// accepted as it is when the client follows it.
		if again, act := pn.apply(got); again != got || act != pathContinue {
			t.Fatalf("%+v: not idempotent: %q → %q → %q (%v)", pn, target, got, again, act)
		}
		// A path that needs no change comes back unchanged, the same
		// string (no copy on the hot path).
		if alreadyNormal(pn, target) {
			if got != target || unsafe.StringData(got) != unsafe.StringData(target) || action != pathContinue {
				t.Fatalf("%+v: normal %q came back as %q, %v", pn, target, got, action)
			}
		}
	})
}

// pathNormFor maps the fuzzer's option bits to a pathNorm: bit 0
// normalize_path, bit 1 merge_slashes, bits 2-3 the escaped-slash action.
func pathNormFor(opts uint8) pathNorm {
	return pathNorm{
		normalize:    opts&1 != 0,
		mergeSlashes: opts&2 != 0,
		escapedSlashes: [...]hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction{
			hcmv3.HttpConnectionManager_KEEP_UNCHANGED,
			hcmv3.HttpConnectionManager_REJECT_REQUEST,
			hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT,
			hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD,
		}[opts>>2&3],
	}
}

// dotSegment returns a "." or ".." segment of path (separated by '/' or
// '\', as URL parsers read it), written plainly or percent-encoded, with
// or without path parameters (";x"), as servers behind the proxy may
// resolve them.
func dotSegment(path string) (string, bool) {
	for _, seg := range strings.FieldsFunc(path, func(r rune) bool { return r == '/' || r == '\\' }) {
		name, _, _ := strings.Cut(seg, ";")
		name = strings.ReplaceAll(strings.ReplaceAll(name, "%2e", "."), "%2E", ".")
		if name == "." || name == ".." {
			return seg, true
		}
	}
	return "", false
}

// alreadyNormal is an independent, deliberately narrow statement of a
// path no option changes: segments of unreserved characters only, none
// "." or "..", no empty segment, and no query.
func alreadyNormal(pn pathNorm, target string) bool {
	if target == "" || target[0] != '/' || strings.Contains(target, "//") {
		return false
	}
	for _, seg := range strings.Split(target[1:], "/") {
		if seg == "." || seg == ".." {
			return false
		}
		for i := 0; i < len(seg); i++ {
			if pathClass[seg[i]]&clsUnescape == 0 && seg[i] != '.' {
				return false
			}
		}
	}
	return true
}
