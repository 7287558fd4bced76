package httpconn

import (
	"net/http"
	"strings"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// pathAction is what the connection manager does with a request once its
// :path went through path_with_escaped_slashes_action, normalize_path and
// merge_slashes (Envoy's ConnectionManagerUtility::NormalizePathAction).
type pathAction uint8

const (
	pathContinue pathAction = iota
	pathReject              // 400, path_normalization_failed
	pathRedirect            // 307 to the unescaped path (UNESCAPE_AND_REDIRECT)
)

// pathNorm is the connection manager's path handling, fixed at parse time.
type pathNorm struct {
	normalize      bool // normalize_path
	mergeSlashes   bool // merge_slashes
	escapedSlashes hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction
}

// apply runs Envoy's maybeNormalizePath on a request target (path and
// query) in Envoy's order, and returns the target to route on and forward:
//
//  1. A '#' in the target is rejected (Envoy's
//     http_reject_path_with_fragment, on by default): a fragment is not
//     part of a request target (RFC 9110 section 7.1), and what follows it
//     would otherwise escape normalization.
//  2. path_with_escaped_slashes_action other than KEEP_UNCHANGED (the
//     IMPLEMENTATION_SPECIFIC_DEFAULT in Envoy) replaces %2F and %5C
//     (either case) in the path; when there were any, REJECT_REQUEST
//     rejects and UNESCAPE_AND_REDIRECT redirects after the steps below.
//  3. normalize_path: RFC 3986 section 6 as Envoy does it with its copy
//     of Chromium's path canonicalizer (canonicalPath).
//  4. merge_slashes, after normalization "to catch edge cases with
//     percent encoding".
//
// The query is never changed. A target that is already normal (the usual
// request) comes back as is, without allocating.
func (pn *pathNorm) apply(target string) (string, pathAction) {
	if strings.IndexByte(target, '#') >= 0 {
		return target, pathReject
	}
	if target == "" || target[0] != '/' {
		return target, pathContinue // "*" (OPTIONS) or authority-form: no path to normalize
	}
	path, query := target, ""
	if i := strings.IndexByte(target, '?'); i >= 0 {
		path, query = target[:i], target[i:]
	}
	orig := path
	action := pathContinue
	switch pn.escapedSlashes {
	case hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT, hcmv3.HttpConnectionManager_KEEP_UNCHANGED:
	default:
		if p, found := unescapeSlashes(path); found {
			switch pn.escapedSlashes {
			case hcmv3.HttpConnectionManager_REJECT_REQUEST:
				return target, pathReject
			case hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT:
				action = pathRedirect
			}
			path = p
		}
	}
	if pn.normalize {
		p, ok := canonicalPath(path)
		if !ok {
			return target, pathReject
		}
		path = p
	}
	if pn.mergeSlashes {
		path = mergeSlashes(path)
	}
	if path == orig {
		return target, action
	}
	return path + query, action
}

// unescapeSlashes is Envoy's PathUtil::unescapeSlashes on a path without
// query: %2F and %2f become '/', %5C and %5c '\'.
func unescapeSlashes(path string) (string, bool) {
	i := strings.IndexByte(path, '%')
	if i < 0 {
		return path, false
	}
	var b []byte
	for ; i < len(path); i++ {
		c := path[i]
		if c == '%' && i+2 < len(path) {
			switch path[i+1 : i+3] {
			case "2F", "2f":
				c = '/'
			case "5C", "5c":
				c = '\\'
			}
			if c != '%' {
				if b == nil {
					b = append(make([]byte, 0, len(path)), path[:i]...)
				}
				b = append(b, c)
				i += 2
				continue
			}
		}
		if b != nil {
			b = append(b, c)
		}
	}
	if b == nil {
		return path, false
	}
	return string(b), true
}

// mergeSlashes is Envoy's PathUtil::mergeSlashes on a path without query:
// runs of '/' become one, a leading and a trailing '/' are kept. A path of
// slashes only is "/" (Envoy's prefix-plus-suffix makes it "//", which
// would still have a run to merge).
func mergeSlashes(path string) string {
	if !strings.Contains(path, "//") {
		return path
	}
	var b strings.Builder
	b.Grow(len(path))
	if path[0] == '/' {
		b.WriteByte('/')
	}
	first := true
	for _, seg := range strings.Split(path, "/") {
		if seg == "" {
			continue
		}
		if !first {
			b.WriteByte('/')
		}
		first = false
		b.WriteString(seg)
	}
	if path[len(path)-1] == '/' && (!first || path[0] != '/') {
		b.WriteByte('/')
	}
	return b.String()
}

// Character classes of Chromium's path canonicalizer (url_canon_path.cc,
// kPathCharLookup, the copy Envoy builds): pass copies a byte, escape
// percent-encodes it, unescape marks the RFC 3986 unreserved characters
// whose percent-encoding is decoded, special needs a look (dot, percent,
// backslash), invalid fails the path (NUL).
const (
	clsPass     = 0
	clsSpecial  = 1
	clsEscape   = 2 | clsSpecial
	clsUnescape = 4
	clsInvalid  = 8 | clsSpecial
)

var pathClass = func() (t [256]uint8) {
	for c := 0; c < 256; c++ {
		switch {
		case c == 0:
			t[c] = clsInvalid
		case c <= 0x20 || c >= 0x7f:
			t[c] = clsEscape
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '~':
			t[c] = clsUnescape
		}
	}
	for _, c := range `"#%<>?\^` + "`{|}" {
		t[c] = clsEscape
	}
	t['.'] = clsSpecial
	return t
}()

// canonicalPath is Envoy's PathUtil::canonicalPath on a path without
// query (RFC 3986 section 6 normalization the way Chromium's
// canonicalizer does it, which Envoy uses):
//
//   - Path parameters are stripped from dot segments first ("/..;x" is
//     ".."), as Envoy does since GHSA-2w8w-rfw7-8gg4: servers such as
//     Tomcat treat "..;x" as "..", so "/public/..;/admin" must not route
//     as "/public".
//   - "." and ".." segments are removed (RFC 3986 5.2.4), also when
//     written %2E; ".." above the root stays at the root.
//   - '\' becomes '/'.
//   - Percent-encoded unreserved characters (ALPHA, DIGIT, "-", "_", "~",
//     and "." as above) are decoded; other escapes are kept with their
//     hex digits' case (no case normalization, as Envoy); a '%' not
//     followed by two hex digits is kept, unless decoding made it an
//     escape ("%%32e" would be "%2e"): it is then written "%25", as
//     Chromium's CheckForNestedEscapes does, so that the result is a
//     fixed point and a server that decodes once more sees no new dot.
//   - Bytes a path may not hold raw (controls, space, '"', '<', '>', '^',
//     '`', '{', '|', '}', DEL, non-ASCII) are percent-encoded.
//   - NUL, raw or %00, fails the path (false: the request gets 400).
//
// An already canonical path is returned as is, without allocating.
func canonicalPath(path string) (string, bool) {
	if !needsCanonical(path) {
		return path, true
	}
	if strings.Contains(path, ".;") {
		path = stripDotSegmentParams(path)
	}
	out := make([]byte, 0, len(path)+8)
	if path == "" || !isURLSlash(path[0]) {
		out = append(out, '/')
	}
	ok := true
	var lone []int // where a '%' that began no escape was written to out
	n := len(path)
	for i := 0; i < n; i++ {
		c := path[i]
		cls := pathClass[c]
		if cls&clsSpecial == 0 {
			out = append(out, c)
			continue
		}
		if dl := isDot(path, i); dl > 0 {
			if len(out) == 0 || out[len(out)-1] != '/' {
				out = append(out, '.') // part of a name
				i += dl - 1
				continue
			}
			disp, consumed := classifyAfterDot(path, i+dl)
			switch disp {
			case dotName:
				out = append(out, '.')
				i += dl - 1
			case dotCurrent:
				i += dl + consumed - 1
			case dotParent:
				out = backUpToPreviousSlash(out)
				for len(lone) > 0 && lone[len(lone)-1] >= len(out) {
					lone = lone[:len(lone)-1] // its segment is gone
				}
				i += dl + consumed - 1
			}
			continue
		}
		switch {
		case c == '\\':
			out = append(out, '/')
		case c == '%':
			if i+2 < n && isHex(path[i+1]) && isHex(path[i+2]) {
				v := unhex(path[i+1])<<4 | unhex(path[i+2])
				vc := pathClass[v]
				switch {
				case vc&clsUnescape != 0:
					out = append(out, v)
				case vc == clsInvalid:
					out = append(out, path[i:i+3]...)
					ok = false
				default:
					out = append(out, path[i:i+3]...)
				}
				i += 2
			} else {
				lone = append(lone, len(out))
				out = append(out, '%')
			}
		case cls == clsInvalid:
			out = appendEscaped(out, c)
			ok = false
		default: // clsEscape
			out = appendEscaped(out, c)
		}
	}
	if !ok {
		return "", false
	}
	if lone != nil {
		out = escapeNestedPercents(out, lone)
	}
	return string(out), true
}

// escapeNestedPercents writes as "%25" each '%' of out at the offsets in
// lone (ascending) that decoding turned into the start of an escape: the
// '%' of "%%32e" is followed by "2e" once "%32" is decoded.
func escapeNestedPercents(out []byte, lone []int) []byte {
	var b []byte
	last := 0
	for _, p := range lone {
		if p+2 < len(out) && isHex(out[p+1]) && isHex(out[p+2]) {
			b = append(append(b, out[last:p+1]...), "25"...)
			last = p + 1
		}
	}
	if b == nil {
		return out
	}
	return append(b, out[last:]...)
}

// needsCanonical reports whether canonicalPath could change path: a byte
// to escape, a backslash, a dot after a slash that may start a dot
// segment, or an escape that decodes to an unreserved character, a dot or
// NUL. Anything else is already canonical.
func needsCanonical(path string) bool {
	if path == "" || path[0] != '/' {
		return true
	}
	for i := 0; i < len(path); i++ {
		c := path[i]
		cls := pathClass[c]
		if cls&clsSpecial == 0 {
			continue
		}
		switch c {
		case '.':
			if path[i-1] != '/' { // i > 0: path[0] is '/'
				continue
			}
			j := i + 1
			if j < len(path) && path[j] == '.' {
				j++
			}
			if j == len(path) || path[j] == '/' || path[j] == ';' || path[j] == '\\' || path[j] == '%' {
				return true
			}
		case '%':
			if i+2 < len(path) && isHex(path[i+1]) && isHex(path[i+2]) {
				v := unhex(path[i+1])<<4 | unhex(path[i+2])
				if pathClass[v]&clsUnescape != 0 || v == '.' || v == 0 {
					return true
				}
			}
		default:
			return true
		}
	}
	return false
}

// stripDotSegmentParams is Envoy's stripParametersFromDotSegments: a
// segment starting "..;" becomes "..", one starting ".;" becomes ".".
func stripDotSegmentParams(path string) string {
	segs := strings.Split(path, "/")
	for i, s := range segs {
		switch {
		case strings.HasPrefix(s, "..;"):
			segs[i] = ".."
		case strings.HasPrefix(s, ".;"):
			segs[i] = "."
		}
	}
	return strings.Join(segs, "/")
}

type dotDisposition uint8

const (
	dotName    dotDisposition = iota // part of a file name
	dotCurrent                       // "."
	dotParent                        // ".."
)

// isDot returns the length of a dot at i: 1 for '.', 3 for "%2e"/"%2E".
func isDot(s string, i int) int {
	if s[i] == '.' {
		return 1
	}
	if s[i] == '%' && i+3 <= len(s) && s[i+1] == '2' && (s[i+2] == 'e' || s[i+2] == 'E') {
		return 3
	}
	return 0
}

func isURLSlash(c byte) bool { return c == '/' || c == '\\' }

// classifyAfterDot looks at what follows a dot that starts a segment and
// how many more bytes (the second dot, path parameters, the slash) that
// segment consumes.
//
// Parameters on a dot segment ("..;x") are dropped with it here too:
// stripDotSegmentParams only sees segments written with plain dots
// between '/', so "/a/%2e%2e;x/b" or "/a\..;x" would otherwise come out
// as "/a/..;x/b", a ".." for the servers that ignore the parameters, which
// the routes never saw.
func classifyAfterDot(s string, after int) (dotDisposition, int) {
	disp, end := dotCurrent, after
	if end < len(s) {
		if dl := isDot(s, end); dl > 0 {
			disp, end = dotParent, end+dl
		}
	}
	if end < len(s) && s[end] == ';' {
		for end < len(s) && !isURLSlash(s[end]) {
			end++
		}
	}
	switch {
	case end == len(s):
		return disp, end - after
	case isURLSlash(s[end]):
		return disp, end + 1 - after
	}
	return dotName, 0
}

// backUpToPreviousSlash drops the last segment of out, which ends in '/',
// never going above the first slash.
func backUpToPreviousSlash(out []byte) []byte {
	i := len(out) - 1
	if i <= 0 {
		return out
	}
	i--
	for out[i] != '/' && i > 0 {
		i--
	}
	return out[:i+1]
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}

func appendEscaped(out []byte, c byte) []byte {
	const hex = "0123456789ABCDEF"
	return append(out, '%', hex[c>>4], hex[c&15])
}

// normalizePath applies the connection manager's path handling to the
// stream before routing. It reports false when the stream was answered:
// 400 for a path that fails (downstream_rq_failed_path_normalization), or
// with UNESCAPE_AND_REDIRECT a 307 to the unescaped path
// (downstream_rq_redirected_with_normalized_path; gRPC, which cannot
// follow it, gets the 400, INTERNAL). The normalized target is what
// routes match, header matchers see as :path, the access log records and
// the upstream receives.
func (s *stream) normalizePath() bool {
	target, action := s.cfg.paths.apply(s.target)
	switch action {
	case pathReject:
		s.cfg.stats.FailedPathNormalization.Add(1)
		s.localReply(http.StatusBadRequest, "", "path_normalization_failed")
		return false
	case pathRedirect:
		if isGRPC(s.r) {
			s.cfg.stats.FailedPathNormalization.Add(1)
			s.localReply(http.StatusBadRequest, "", "path_normalization_failed")
			return false
		}
		s.cfg.stats.RedirectedWithNormalizedPath.Add(1)
		s.replyHeader()["Location"] = []string{target}
		s.e.ResponseCodeDetails = "path_normalization_failed"
		s.writeHeader(http.StatusTemporaryRedirect)
		return false
	}
	if target != s.target {
		s.target, s.e.Path, s.r.RequestURI = target, target, target
	}
	return true
}
