package rbac

import (
	"fmt"
	"regexp"
	"strings"
)

type regexpT = regexp.Regexp

// Envoy's uri_template character classes (RFC 3986 pchar without '/'):
// "*" and {var} match one path segment, "**" and {var=**} any number.
const (
	segChars   = `[a-zA-Z0-9\-._~%!$&'()+,;:@=]+`
	multiChars = `[a-zA-Z0-9\-._~%!$&'()+,;:@=/]*`
)

// compileURITemplate turns a path template ("/v1/*/items/{id}/**") into
// a full-match regexp.
func compileURITemplate(t string) (*regexp.Regexp, error) {
	if !strings.HasPrefix(t, "/") {
		return nil, fmt.Errorf("%q: must start with /", t)
	}
	var b strings.Builder
	b.WriteString("^")
	for _, seg := range strings.Split(t[1:], "/") {
		b.WriteString("/")
		switch {
		case seg == "*":
			b.WriteString(segChars)
		case seg == "**":
			b.WriteString(multiChars)
		case strings.HasPrefix(seg, "{") && strings.HasSuffix(seg, "}"):
			v := seg[1 : len(seg)-1]
			name, op, _ := strings.Cut(v, "=")
			if name == "" {
				return nil, fmt.Errorf("%q: empty variable name", t)
			}
			switch op {
			case "", "*":
				b.WriteString(segChars)
			case "**":
				b.WriteString(multiChars)
			default:
				return nil, fmt.Errorf("%q: variable %q: only * and ** are supported", t, name)
			}
		case strings.ContainsAny(seg, "*{}"):
			return nil, fmt.Errorf("%q: segment %q mixes literal text and operators", t, seg)
		default:
			b.WriteString(regexp.QuoteMeta(seg))
		}
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}
