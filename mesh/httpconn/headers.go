package httpconn

import (
	"fmt"
	"net/http"
	"net/textproto"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// headerOps is one level's request_headers_to_add/remove (or the response
// pair): removals first, then additions, as Envoy's HeaderParser.
type headerOps struct {
	remove []string // canonical keys
	add    []headerAdd
}

type headerAdd struct {
	key       string // canonical key; "Host" rewrites the authority
	value     format
	action    corev3.HeaderValueOption_HeaderAppendAction
	keepEmpty bool
}

func (h *headerOps) empty() bool { return h == nil || (len(h.remove) == 0 && len(h.add) == 0) }

func compileHeaderOps(add []*corev3.HeaderValueOption, remove []string, field string) (*headerOps, error) {
	if len(add) == 0 && len(remove) == 0 {
		return nil, nil
	}
	ops := &headerOps{}
	addField, removeField := field+"_headers_to_add", field+"_headers_to_remove"
	for i, r := range remove {
		if r == "" || r[0] == ':' || strings.EqualFold(r, "host") {
			return nil, fieldf(fmt.Sprintf("%s[%d]", removeField, i), "%q cannot be removed", r)
		}
		ops.remove = append(ops.remove, textproto.CanonicalMIMEHeaderKey(r))
	}
	for i, o := range add {
		f := fmt.Sprintf("%s[%d]", addField, i)
		k := o.GetHeader().GetKey()
		if k == "" || k[0] == ':' {
			return nil, fieldf(f+".header.key", "%q cannot be added", k)
		}
		v := o.GetHeader().GetValue()
		if rv := o.GetHeader().GetRawValue(); len(rv) > 0 {
			v = string(rv)
		}
		val, err := parseFormat(v)
		if err != nil {
			return nil, at(f+".header.value", err)
		}
		a := headerAdd{key: textproto.CanonicalMIMEHeaderKey(k), value: val, action: o.GetAppendAction(), keepEmpty: o.GetKeepEmptyValue()}
		if o.GetAppend() != nil {
			if a.action != corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
				return nil, fieldf(f, "append and append_action are mutually exclusive")
			}
			if !o.GetAppend().GetValue() {
				a.action = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
			}
		}
		ops.add = append(ops.add, a)
	}
	return ops, nil
}

// apply edits h (and the authority, for Host) for one request.
func (ops *headerOps) apply(h http.Header, host *string, fc *formatCtx) {
	if ops == nil {
		return
	}
	for _, k := range ops.remove {
		delete(h, k)
	}
	for i := range ops.add {
		a := &ops.add[i]
		v := a.value.render(fc)
		if v == "" && !a.keepEmpty {
			continue
		}
		if a.key == "Host" && host != nil {
			if a.action != corev3.HeaderValueOption_ADD_IF_ABSENT && a.action != corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD || *host == "" {
				*host = v
			}
			continue
		}
		_, exists := h[a.key]
		switch a.action {
		case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
			h[a.key] = append(h[a.key], v)
		case corev3.HeaderValueOption_ADD_IF_ABSENT:
			if !exists {
				h[a.key] = []string{v}
			}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
			h[a.key] = []string{v}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
			if exists {
				h[a.key] = []string{v}
			}
		}
	}
}

// format is a header value with Envoy command operators: literal parts
// and variables, rendered per request.
type format struct {
	lit   string // the whole value when it has no operator
	parts []formatPart
}

type formatPart struct {
	lit string
	op  string // "" for a literal part
	arg string // %REQ(arg)%
}

// formatCtx is what header values may refer to.
type formatCtx struct {
	r          *http.Request
	down       *ConnInfo
	proto      string
	upstream   string // upstream host address, once known
	requestID  string
	authority  string
	routeName  string
	clusterNam string
}

var formatOps = map[string]bool{
	"DOWNSTREAM_REMOTE_ADDRESS":              true,
	"DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": true,
	"DOWNSTREAM_LOCAL_ADDRESS":               true,
	"DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT":  true,
	"DOWNSTREAM_LOCAL_PORT":                  true,
	"PROTOCOL":                               true,
	"REQUEST_ID":                             true,
	"ROUTE_NAME":                             true,
	"UPSTREAM_CLUSTER":                       true,
	"HOSTNAME":                               true,
	"REQ":                                    true,
}

// parseFormat splits v at %OPERATOR% and %REQ(name)%; "%%" is a literal
// '%'. An operator this engine cannot render is an error, as Envoy rejects
// an unknown one.
func parseFormat(v string) (format, error) {
	if !strings.Contains(v, "%") {
		return format{lit: v}, nil
	}
	var f format
	var lit strings.Builder
	for i := 0; i < len(v); {
		if v[i] != '%' {
			lit.WriteByte(v[i])
			i++
			continue
		}
		if i+1 < len(v) && v[i+1] == '%' {
			lit.WriteByte('%')
			i += 2
			continue
		}
		end := strings.IndexByte(v[i+1:], '%')
		if end < 0 {
			return f, fmt.Errorf("%q: unterminated %% operator", v)
		}
		tok := v[i+1 : i+1+end]
		op, arg := tok, ""
		if j := strings.IndexByte(tok, '('); j >= 0 && strings.HasSuffix(tok, ")") {
			op, arg = tok[:j], tok[j+1:len(tok)-1]
		}
		if !formatOps[op] || (op == "REQ") != (arg != "") {
			return f, fmt.Errorf("%q: unsupported operator %%%s%%", v, tok)
		}
		if lit.Len() > 0 {
			f.parts = append(f.parts, formatPart{lit: lit.String()})
			lit.Reset()
		}
		if op == "REQ" {
			arg = textproto.CanonicalMIMEHeaderKey(arg)
		}
		f.parts = append(f.parts, formatPart{op: op, arg: arg})
		i += end + 2
	}
	if lit.Len() > 0 {
		f.parts = append(f.parts, formatPart{lit: lit.String()})
	}
	return f, nil
}

func (f *format) render(c *formatCtx) string {
	if f.parts == nil {
		return f.lit
	}
	var b strings.Builder
	for _, p := range f.parts {
		if p.op == "" {
			b.WriteString(p.lit)
			continue
		}
		b.WriteString(c.value(p.op, p.arg))
	}
	return b.String()
}

func (c *formatCtx) value(op, arg string) string {
	switch op {
	case "DOWNSTREAM_REMOTE_ADDRESS":
		return addrString(c.down.Peer)
	case "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT":
		if c.down.Peer.IsValid() {
			return c.down.Peer.Addr().String()
		}
	case "DOWNSTREAM_LOCAL_ADDRESS":
		return addrString(c.down.Local)
	case "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT":
		if c.down.Local.IsValid() {
			return c.down.Local.Addr().String()
		}
	case "DOWNSTREAM_LOCAL_PORT":
		if c.down.Local.IsValid() {
			return fmt.Sprint(c.down.Local.Port())
		}
	case "PROTOCOL":
		return c.proto
	case "REQUEST_ID":
		return c.requestID
	case "ROUTE_NAME":
		return c.routeName
	case "UPSTREAM_CLUSTER":
		return c.clusterNam
	case "HOSTNAME":
		return hostname
	case "REQ":
		if arg == "Host" || arg == ":authority" {
			return c.authority
		}
		return c.r.Header.Get(arg)
	}
	return ""
}

// hopByHop are the headers a proxy does not forward (RFC 9110 7.6.1 and
// Envoy's list). TE is kept when it is "trailers" (gRPC needs it).
var hopByHop = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Te", "Proxy-Authenticate"}

// stripHopByHop removes hop-by-hop headers and those the Connection
// header names.
func stripHopByHop(h http.Header, keepTrailersTE bool) {
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				delete(h, textproto.CanonicalMIMEHeaderKey(f))
			}
		}
	}
	te := h["Te"]
	for _, k := range hopByHop {
		delete(h, k)
	}
	if keepTrailersTE {
		for _, v := range te {
			if strings.EqualFold(strings.TrimSpace(v), "trailers") {
				h["Te"] = []string{"trailers"}
				break
			}
		}
	}
}

func (s *stream) responseHeaderOps(h http.Header, routes *Routes, vh *VirtualHost, rt *Route, wc *weightedCluster) {
	fc := &formatCtx{r: s.r, down: &s.h.info, proto: s.r.Proto, requestID: s.e.RequestID, authority: s.r.Host, routeName: s.e.RouteName, clusterNam: s.e.UpstreamCluster}
	levels := [4]*headerOps{}
	if wc != nil {
		levels[0] = wc.rspOps
	}
	levels[1], levels[2], levels[3] = rt.rspOps, vh.rspOps, routes.rspOps
	applyLevels(levels, routes.mostSpecific, h, nil, fc)
}

// applyLevels applies header edits from the most to the least specific
// level (weighted cluster, route, virtual host, route configuration), so
// a less specific level has the last word, as Envoy by default; with
// most_specific_header_mutations_wins the order is reversed.
func applyLevels(levels [4]*headerOps, mostSpecificWins bool, h http.Header, host *string, fc *formatCtx) {
	if mostSpecificWins {
		for i := len(levels) - 1; i >= 0; i-- {
			levels[i].apply(h, host, fc)
		}
		return
	}
	for _, l := range levels {
		l.apply(h, host, fc)
	}
}
