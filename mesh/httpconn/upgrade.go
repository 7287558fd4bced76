package httpconn

import (
	"fmt"
	"net/http"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// upgrades is a set of upgrade_configs: the upgrade types (lower case, as
// Envoy compares them without case) and whether each is enabled. A route's
// set overrides the connection manager's type by type, as Envoy's
// per-route upgrade map does.
type upgrades map[string]bool

// parseHCMUpgrades reads http_connection_manager.upgrade_configs. A
// per-upgrade filter chain (filters) is refused: meshtun runs the
// connection manager's own filters on every request.
func parseHCMUpgrades(cfgs []*hcmv3.HttpConnectionManager_UpgradeConfig) (upgrades, error) {
	if len(cfgs) == 0 {
		return nil, nil
	}
	u := upgrades{}
	for i, c := range cfgs {
		field := fmt.Sprintf("upgrade_configs[%d]", i)
		typ := strings.ToLower(c.GetUpgradeType())
		if _, dup := u[typ]; dup {
			return nil, fieldf(field+".upgrade_type", "multiple upgrade configs with the same name: %q", c.GetUpgradeType())
		}
		if len(c.GetFilters()) > 0 {
			return nil, fieldf(field+".filters", "a filter chain per upgrade type is not supported")
		}
		u[typ] = c.GetEnabled() == nil || c.GetEnabled().GetValue()
	}
	return u, nil
}

// parseRouteUpgrades reads route.upgrade_configs; terminate reports a
// CONNECT entry with connect_config (the proxy terminates CONNECT).
// connect_config on another type is refused, as Envoy does, and so are
// its proxy_protocol_config and allow_post, which meshtun does not do.
func parseRouteUpgrades(cfgs []*routev3.RouteAction_UpgradeConfig) (u upgrades, terminate bool, err error) {
	if len(cfgs) == 0 {
		return nil, false, nil
	}
	u = upgrades{}
	for i, c := range cfgs {
		field := fmt.Sprintf("upgrade_configs[%d]", i)
		typ := strings.ToLower(c.GetUpgradeType())
		if _, dup := u[typ]; dup {
			return nil, false, fieldf(field+".upgrade_type", "multiple upgrade configs with the same name: %q", c.GetUpgradeType())
		}
		u[typ] = c.GetEnabled() == nil || c.GetEnabled().GetValue()
		cc := c.GetConnectConfig()
		if cc == nil {
			continue
		}
		switch {
		case typ != "connect":
			return nil, false, fieldf(field+".connect_config", "non-CONNECT upgrade type %q has connect_config", c.GetUpgradeType())
		case cc.GetProxyProtocolConfig() != nil:
			return nil, false, fieldf(field+".connect_config.proxy_protocol_config", "not supported")
		case cc.GetAllowPost():
			return nil, false, fieldf(field+".connect_config.allow_post", "not supported")
		}
		terminate = true
	}
	return u, terminate, nil
}

// upgradeAllowed reports whether requests upgrading to typ (compared
// without case) may go through rt (nil: no route): the route's
// upgrade_configs decide for the types they list, the connection
// manager's for the others, as in Envoy. "CONNECT" is the type of CONNECT
// requests.
func (c *Config) upgradeAllowed(rt *Route, typ string) bool {
	typ = strings.ToLower(typ)
	if rt != nil {
		if on, ok := rt.upgrades[typ]; ok {
			return on
		}
	}
	return c.upgrades[typ]
}

// upgradeType returns the protocol an HTTP/1.1 request asks to switch to
// ("" when it asks none): an Upgrade header with "upgrade" among the
// Connection tokens, as Envoy's Utility::isUpgrade. "h2c" is not an
// upgrade the proxy forwards: Envoy drops those headers and serves the
// request as HTTP/1.1, and so does buildHeaders (they are hop-by-hop).
//
// Over HTTP/2 the upgrade is RFC 8441's extended CONNECT (its :protocol),
// taken only when allowConnect (http2_protocol_options.allow_connect) is
// set; without it ok is false: Envoy would not have announced extended
// CONNECT, and the request is refused. net/http's HTTP/2 server accepts
// extended CONNECT only when the process runs with GODEBUG=http2xconnect=1
// (read once, at start); without it such a request never reaches the
// proxy.
func upgradeType(r *http.Request, allowConnect bool) (typ string, ok bool) {
	if r.ProtoMajor == 2 {
		if p := r.Header[":protocol"]; r.Method == http.MethodConnect && len(p) > 0 {
			return p[0], allowConnect
		}
		return "", true
	}
	if r.ProtoMajor != 1 {
		return "", true
	}
	up := r.Header["Upgrade"]
	if len(up) == 0 || up[0] == "" || !connectionHas(r.Header, "upgrade") {
		return "", true
	}
	if strings.EqualFold(strings.TrimSpace(up[0]), "h2c") {
		return "", true
	}
	return strings.TrimSpace(up[0]), true
}

// connectionHas reports whether the Connection header lists token.
func connectionHas(h http.Header, token string) bool {
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), token) {
				return true
			}
		}
	}
	return false
}
