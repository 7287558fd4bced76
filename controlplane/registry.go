package controlplane

import (
	"fmt"
	"net/netip"
	"regexp"
	"sort"
	"strings"
)

// The registry file lists the mesh's services (Kubernetes Services with
// their endpoints) and external hosts (Istio ServiceEntries):
//
//	apiVersion: meshtun.io/v1alpha1     # optional
//	kind: Registry                      # optional
//	services:
//	- name: reviews
//	  namespace: default
//	  vip: 10.96.0.20
//	  ports: [{name: tcp, port: 9080, protocol: TCP}]
//	  endpoints:
//	  - {address: 10.1.0.10, locality: us-east1/us-east1-b, weight: 2, labels: {version: v1}}
//	  - {address: 10.1.0.11, name: reviews-v2-7d9c, sidecar: true, serviceAccount: reviews,
//	     peerAuthentication: STRICT}
//	externalHosts:
//	- hosts: [api.example.com]
//	  ports: [{name: https, port: 443, protocol: TLS}]
//	  resolution: DNS
//
// parseRegistry validates it and plans every listener, so that generating
// configuration from a valid registry cannot fail.

// registryKind is the optional kind of a registry document.
const registryKind = "Registry"

// Protocol of a port. HTTP ports are served, as Istio serves them, by one
// listener per port number (0.0.0.0_<port>, an http_connection_manager)
// whose route configuration tells the hosts apart by the Host header.
const (
	protocolTCP  = "TCP"
	protocolHTTP = "HTTP"
	protocolTLS  = "TLS"
	protocolUDP  = "UDP"
)

var protocols = []string{protocolTCP, protocolHTTP, protocolTLS, protocolUDP}

// Resolution of an external host (ServiceEntry.resolution).
const (
	resolutionNone   = "NONE"   // ORIGINAL_DST: to the address the client used
	resolutionStatic = "STATIC" // EDS with the listed IP endpoints
	resolutionDNS    = "DNS"    // STRICT_DNS of the endpoints, or of the hosts
)

var resolutions = []string{resolutionNone, resolutionStatic, resolutionDNS}

// clusterDomain is the DNS suffix of service host names.
const clusterDomain = "cluster.local"

// registryFile is the registry document as written.
type registryFile struct {
	APIVersion    string         `json:"apiVersion"`
	Kind          string         `json:"kind"`
	Services      []serviceSpec  `json:"services"`
	ExternalHosts []externalSpec `json:"externalHosts"`
	// AuthorizationPolicies are Istio AuthorizationPolicies (authz.go).
	AuthorizationPolicies []authzPolicySpec `json:"authorizationPolicies"`
}

// serviceSpec is a mesh service: a VIP in front of endpoints.
type serviceSpec struct {
	Name      string         `json:"name"`
	Namespace string         `json:"namespace"` // default "default"
	VIP       string         `json:"vip"`
	Ports     []portSpec     `json:"ports"`
	Endpoints []endpointSpec `json:"endpoints"`
}

// externalSpec is a host outside the mesh (a ServiceEntry, MESH_EXTERNAL).
type externalSpec struct {
	Hosts      []string       `json:"hosts"`
	Addresses  []string       `json:"addresses"`
	Ports      []portSpec     `json:"ports"`
	Resolution string         `json:"resolution"` // default NONE, as Istio
	Endpoints  []endpointSpec `json:"endpoints"`
}

// portSpec is a service port.
type portSpec struct {
	Name       string `json:"name"`
	Port       uint32 `json:"port"`
	TargetPort uint32 `json:"targetPort"` // default: port
	Protocol   string `json:"protocol"`   // TCP, HTTP, TLS or UDP, any case
}

// endpointSpec is one endpoint. Its port for a service port is, in order:
// ports[<port name>], port, the service port's targetPort, its port.
//
// A service endpoint is a workload (a pod): sidecar says it runs a meshtun
// or Istio sidecar with a workload identity (Istio's injected pod, label
// security.istio.io/tlsMode=istio), which mesh clients then reach over
// mTLS; serviceAccount is its identity's account; peerAuthentication
// overrides the profile's mode for it. One workload may back several
// services: its entries must then agree on these fields.
type endpointSpec struct {
	Address            string            `json:"address"` // IP; a host name for DNS resolution
	Port               uint32            `json:"port"`
	Ports              map[string]uint32 `json:"ports"`
	Labels             map[string]string `json:"labels"`
	Locality           string            `json:"locality"` // region/zone/subzone
	Weight             *uint32           `json:"weight"`   // default 1
	Name               string            `json:"name"`     // the pod's name; default the service's
	Sidecar            bool              `json:"sidecar"`
	ServiceAccount     string            `json:"serviceAccount"`     // default "default"
	PeerAuthentication PeerAuthMode      `json:"peerAuthentication"` // default: the profile's
}

// Registry is a validated registry: every host, the listener plan, and the
// workloads behind the services (by IP), whose inbound side a sidecar
// with that IP gets.
type Registry struct {
	hosts     []*host // services first, then external hosts, in file order
	listeners []*listenerPlan
	workloads map[netip.Addr]*workload
	policies  []*authzPolicy // by namespace and name
}

// host is one service or external host name with its ports and endpoints.
type host struct {
	Name       string // FQDN: <name>.<namespace>.svc.cluster.local, or the external host
	Service    string // services: name and namespace
	Namespace  string
	External   bool
	Resolution string
	Addresses  []netip.Addr // VIP, or the external addresses
	Ports      []port
	Endpoints  []endpoint
	label      string // for errors: services[0] (reviews.default)
}

// port is a validated port.
type port struct {
	Name       string
	Number     uint16
	TargetPort uint16
	Protocol   string
}

// endpoint is a validated endpoint.
type endpoint struct {
	Address string // IP literal, or a host name (DNS resolution)
	IP      netip.Addr
	Port    uint32 // 0 when unset
	Ports   map[string]uint32
	Labels  map[string]string
	Region  string
	Zone    string
	SubZone string
	Weight  uint32
	// Name is the workload's name (default the service's); Sidecar,
	// ServiceAccount (never "") and Mode ("" = the profile's) its
	// mesh identity.
	Name           string
	Sidecar        bool
	ServiceAccount string
	Mode           PeerAuthMode
}

// PortFor is the endpoint's port for service port p.
func (e *endpoint) PortFor(p port) uint32 {
	if v, ok := e.Ports[p.Name]; ok && p.Name != "" {
		return v
	}
	if e.Port != 0 {
		return e.Port
	}
	return uint32(p.TargetPort)
}

// clusterName is Istio's outbound cluster name for port of host.
func clusterName(port uint16, host string) string {
	return fmt.Sprintf("outbound|%d||%s", port, host)
}

// listenerPlan is one outbound listener: an address (unspecified for the
// wildcard) and a port, and the host ports it serves. plan also uses it to
// record which host ports use an address and port.
type listenerPlan struct {
	addr     netip.AddrPort
	protocol string // the protocol of every route
	routes   []route
}

type route struct {
	host *host
	port port
}

// parseRegistry decodes and validates a registry document. source names it
// in errors: "<source>: services[1] (ratings.default): ports[0].protocol: …".
func parseRegistry(source string, data []byte) (*Registry, error) {
	var f registryFile
	doc, err := decodeStrict(data, &f)
	if err != nil {
		if fe, ok := asFieldError(err); ok {
			return nil, fmt.Errorf("%s: %s", source, labelPath(doc, fe))
		}
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	r, err := f.validate()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	return r, nil
}

// EmptyRegistry has no host: the sidecar gets only the virtual listeners
// and the special clusters.
func EmptyRegistry() *Registry { return &Registry{} }

// labelPath writes a decode error with the entry it is in named:
// services[1].ports → services[1] (ratings.default): ports.
func labelPath(doc map[string]any, fe *fieldError) string {
	if fe.Path == "" || doc == nil {
		return fe.Error()
	}
	for _, list := range []string{"services", "externalHosts"} {
		if !strings.HasPrefix(fe.Path, list+"[") {
			continue
		}
		end := strings.IndexByte(fe.Path, ']')
		var i int
		if _, err := fmt.Sscanf(fe.Path[len(list)+1:end], "%d", &i); err != nil {
			break
		}
		entries, _ := doc[list].([]any)
		var name string
		if i < len(entries) {
			if m, ok := entries[i].(map[string]any); ok {
				if list == "services" {
					name = serviceLabel(str(m, "name"), str(m, "namespace"))
				} else if hs, ok := m["hosts"].([]any); ok && len(hs) > 0 {
					name, _ = hs[0].(string)
				}
			}
		}
		head, rest := fe.Path[:end+1], strings.TrimPrefix(fe.Path[end+1:], ".")
		if name != "" {
			head += " (" + name + ")"
		}
		if rest == "" {
			return head + ": " + fe.Msg
		}
		return head + ": " + rest + ": " + fe.Msg
	}
	return fe.Error()
}

func serviceLabel(name, ns string) string {
	if ns == "" {
		ns = "default"
	}
	if name == "" {
		return ""
	}
	return name + "." + ns
}

var (
	dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)
	// dnsSubdomain is a Kubernetes object name (pods, service accounts).
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)
	// dnsName is a host name, optionally with a leading "*." wildcard.
	dnsName = regexp.MustCompile(`^(\*\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)
)

func (f *registryFile) validate() (*Registry, error) {
	if f.APIVersion != "" && f.APIVersion != meshtunAPIVersion {
		return nil, fieldErr("apiVersion", "%s", choiceError(f.APIVersion, []string{meshtunAPIVersion}))
	}
	if f.Kind != "" && f.Kind != registryKind {
		return nil, fieldErr("kind", "%s", choiceError(f.Kind, []string{registryKind}))
	}
	r := &Registry{}
	for i := range f.AuthorizationPolicies {
		p, err := f.AuthorizationPolicies[i].validate(i)
		if err != nil {
			return nil, err
		}
		r.policies = append(r.policies, p)
	}
	sortedPolicies(r.policies)
	byName := map[string]string{} // FQDN -> label of its entry
	for i := range f.Services {
		h, err := f.Services[i].validate(i)
		if err != nil {
			return nil, err
		}
		if other, dup := byName[h.Name]; dup {
			return nil, fmt.Errorf("%s: name: service %s is already defined by %s", h.label, h.Name, other)
		}
		byName[h.Name] = h.label
		r.hosts = append(r.hosts, h)
	}
	for i := range f.ExternalHosts {
		hs, err := f.ExternalHosts[i].validate(i)
		if err != nil {
			return nil, err
		}
		for _, h := range hs {
			if other, dup := byName[h.Name]; dup {
				return nil, fmt.Errorf("%s: hosts: %s is already defined by %s", h.label, h.Name, other)
			}
			byName[h.Name] = h.label
			r.hosts = append(r.hosts, h)
		}
	}
	if err := r.plan(); err != nil {
		return nil, err
	}
	if err := r.collectWorkloads(); err != nil {
		return nil, err
	}
	return r, nil
}

func (s *serviceSpec) validate(i int) (*host, error) {
	ns := s.Namespace
	if ns == "" {
		ns = "default"
	}
	h := &host{Service: s.Name, Namespace: ns, Resolution: resolutionStatic,
		label: fmt.Sprintf("services[%d]", i)}
	if s.Name != "" {
		h.label += " (" + s.Name + "." + ns + ")"
	}
	fail := func(field, format string, args ...any) (*host, error) {
		return nil, fmt.Errorf("%s: %s: %s", h.label, field, fmt.Sprintf(format, args...))
	}
	if !dnsLabel.MatchString(s.Name) {
		return fail("name", "%q is not a DNS label (lower-case letters, digits and '-', at most 63)", s.Name)
	}
	if !dnsLabel.MatchString(ns) {
		return fail("namespace", "%q is not a DNS label (lower-case letters, digits and '-', at most 63)", ns)
	}
	h.Name = fmt.Sprintf("%s.%s.svc.%s", s.Name, ns, clusterDomain)
	vip, err := netip.ParseAddr(s.VIP)
	if err != nil || vip.IsUnspecified() || vip.Zone() != "" {
		return fail("vip", "%q is not a unicast IP address", s.VIP)
	}
	h.Addresses = []netip.Addr{vip.Unmap()}
	if h.Ports, err = validatePorts(s.Ports); err != nil {
		return nil, fmt.Errorf("%s: %w", h.label, err)
	}
	if h.Endpoints, err = validateEndpoints(s.Endpoints, h.Ports, false); err != nil {
		return nil, fmt.Errorf("%s: %w", h.label, err)
	}
	for i := range h.Endpoints {
		if h.Endpoints[i].Name == "" {
			h.Endpoints[i].Name = s.Name
		}
	}
	return h, nil
}

func (x *externalSpec) validate(i int) ([]*host, error) {
	label := fmt.Sprintf("externalHosts[%d]", i)
	if len(x.Hosts) > 0 {
		label += " (" + x.Hosts[0] + ")"
	}
	fail := func(field, format string, args ...any) ([]*host, error) {
		return nil, fmt.Errorf("%s: %s: %s", label, field, fmt.Sprintf(format, args...))
	}
	res := x.Resolution
	if res == "" {
		res = resolutionNone
	}
	if !contains(resolutions, res) {
		return fail("resolution", "%s", choiceError(res, resolutions))
	}
	if len(x.Hosts) == 0 {
		return fail("hosts", "at least one host is required")
	}
	seen := map[string]bool{}
	for j, name := range x.Hosts {
		field := fmt.Sprintf("hosts[%d]", j)
		if !dnsName.MatchString(name) || len(name) > 253 {
			return fail(field, "%q is not a host name (lower-case DNS name, optionally starting with \"*.\")", name)
		}
		if strings.HasPrefix(name, "*.") && res != resolutionNone {
			return fail(field, "wildcard host %q needs resolution NONE (got %s)", name, res)
		}
		if seen[name] {
			return fail(field, "%q is listed twice", name)
		}
		seen[name] = true
	}
	var addrs []netip.Addr
	for j, a := range x.Addresses {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.IsUnspecified() || ip.Zone() != "" {
			return fail(fmt.Sprintf("addresses[%d]", j), "%q is not a unicast IP address (CIDR ranges are not supported)", a)
		}
		addrs = append(addrs, ip.Unmap())
	}
	ports, err := validatePorts(x.Ports)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", label, err)
	}
	switch res {
	case resolutionNone:
		if len(x.Endpoints) > 0 {
			return fail("endpoints", "resolution NONE sends traffic to the address the client used; it takes no endpoints")
		}
	case resolutionStatic:
		if len(x.Endpoints) == 0 {
			return fail("endpoints", "resolution STATIC needs at least one endpoint")
		}
	}
	eps, err := validateEndpoints(x.Endpoints, ports, res == resolutionDNS)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", label, err)
	}
	for j, e := range x.Endpoints {
		if e.Sidecar || e.ServiceAccount != "" || e.PeerAuthentication != "" || e.Name != "" {
			return fail(fmt.Sprintf("endpoints[%d]", j), "name, sidecar, serviceAccount and peerAuthentication describe a workload of the mesh; an external host's endpoints are outside it")
		}
	}
	var out []*host
	for _, name := range x.Hosts {
		h := &host{Name: name, External: true, Resolution: res, Addresses: addrs, Ports: ports, Endpoints: eps, label: label}
		if res == resolutionDNS && len(eps) == 0 {
			// As Istio: without endpoints the host itself is resolved.
			h.Endpoints = []endpoint{{Address: name, Weight: 1}}
		}
		out = append(out, h)
	}
	return out, nil
}

func validatePorts(ps []portSpec) ([]port, error) {
	if len(ps) == 0 {
		return nil, fmt.Errorf("ports: at least one port is required")
	}
	var out []port
	names := map[string]int{}
	numbers := map[uint32]int{}
	for i, p := range ps {
		field := fmt.Sprintf("ports[%d]", i)
		if p.Name != "" {
			if !dnsLabel.MatchString(p.Name) {
				return nil, fmt.Errorf("%s.name: %q is not a DNS label", field, p.Name)
			}
			if j, dup := names[p.Name]; dup {
				return nil, fmt.Errorf("%s.name: %q is already the name of ports[%d]", field, p.Name, j)
			}
			names[p.Name] = i
		}
		if p.Port == 0 || p.Port > 65535 {
			return nil, fmt.Errorf("%s.port: want 1 to 65535, got %d", field, p.Port)
		}
		if j, dup := numbers[p.Port]; dup {
			return nil, fmt.Errorf("%s.port: %d is already used by ports[%d]; one protocol per port number, as in Istio", field, p.Port, j)
		}
		numbers[p.Port] = i
		if p.TargetPort > 65535 {
			return nil, fmt.Errorf("%s.targetPort: want 1 to 65535, got %d", field, p.TargetPort)
		}
		proto := strings.ToUpper(p.Protocol)
		if !contains(protocols, proto) {
			return nil, fmt.Errorf("%s.protocol: %w", field, choiceError(p.Protocol, protocols))
		}
		tp := p.TargetPort
		if tp == 0 {
			tp = p.Port
		}
		out = append(out, port{Name: p.Name, Number: uint16(p.Port), TargetPort: uint16(tp), Protocol: proto})
	}
	return out, nil
}

func validateEndpoints(es []endpointSpec, ports []port, dns bool) ([]endpoint, error) {
	var out []endpoint
	for i, e := range es {
		field := fmt.Sprintf("endpoints[%d]", i)
		ep := endpoint{Address: e.Address, Port: e.Port, Ports: e.Ports, Labels: e.Labels, Weight: 1,
			Name: e.Name, Sidecar: e.Sidecar, ServiceAccount: e.ServiceAccount, Mode: e.PeerAuthentication}
		if ep.ServiceAccount == "" {
			ep.ServiceAccount = "default"
		}
		if !dnsSubdomain.MatchString(ep.ServiceAccount) || len(ep.ServiceAccount) > 253 {
			return nil, fmt.Errorf("%s.serviceAccount: %q is not a Kubernetes name (lower-case letters, digits, '-' and '.')", field, e.ServiceAccount)
		}
		if e.Name != "" && (!dnsSubdomain.MatchString(e.Name) || len(e.Name) > 253) {
			return nil, fmt.Errorf("%s.name: %q is not a Kubernetes name (lower-case letters, digits, '-' and '.')", field, e.Name)
		}
		ip, err := netip.ParseAddr(e.Address)
		switch {
		case err == nil && !ip.IsUnspecified() && ip.Zone() == "":
			ep.IP = ip.Unmap()
			ep.Address = ep.IP.String()
		case dns && dnsName.MatchString(e.Address) && !strings.HasPrefix(e.Address, "*."):
		case dns:
			return nil, fmt.Errorf("%s.address: %q is neither an IP address nor a host name", field, e.Address)
		default:
			return nil, fmt.Errorf("%s.address: %q is not a unicast IP address", field, e.Address)
		}
		if e.Port > 65535 {
			return nil, fmt.Errorf("%s.port: want 1 to 65535, got %d", field, e.Port)
		}
		if e.Port != 0 && len(ports) > 1 {
			return nil, fmt.Errorf("%s.port: ambiguous with %d service ports; use ports: {<port name>: <port>}", field, len(ports))
		}
		for _, name := range sortedKeys(e.Ports) {
			if !hasPortNamed(ports, name) {
				return nil, fmt.Errorf("%s.ports.%s: no service port is named %q", field, name, name)
			}
			if v := e.Ports[name]; v == 0 || v > 65535 {
				return nil, fmt.Errorf("%s.ports.%s: want 1 to 65535, got %d", field, name, v)
			}
		}
		for _, k := range sortedKeys(e.Labels) {
			if k == "" {
				return nil, fmt.Errorf("%s.labels: empty label name", field)
			}
		}
		if e.Weight != nil {
			if *e.Weight == 0 {
				return nil, fmt.Errorf("%s.weight: must be at least 1 (leave it out for 1)", field)
			}
			ep.Weight = *e.Weight
		}
		if e.Locality != "" {
			parts := strings.Split(e.Locality, "/")
			if len(parts) > 3 || slicesContainsEmpty(parts) {
				return nil, fmt.Errorf("%s.locality: %q: want region, region/zone or region/zone/subzone", field, e.Locality)
			}
			parts = append(parts, "", "")
			ep.Region, ep.Zone, ep.SubZone = parts[0], parts[1], parts[2]
		}
		out = append(out, ep)
	}
	return out, nil
}

func slicesContainsEmpty(ss []string) bool {
	for _, s := range ss {
		if s == "" {
			return true
		}
	}
	return false
}

func hasPortNamed(ps []port, name string) bool {
	for _, p := range ps {
		if p.Name == name {
			return true
		}
	}
	return false
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// plan groups every host port into the outbound listeners, as Istio does:
// one listener per address and port (the VIP, each external address, or
// the wildcard 0.0.0.0 for an external host without addresses), except
// for HTTP, whose ports share one wildcard listener per port number
// (0.0.0.0_<port>, routes by Host). Several hosts may share an address and
// port only when all are TLS (told apart by SNI) or all HTTP (by Host); TCP
// and UDP on one address and port would be two listeners of the same name,
// so they conflict too. The wildcard listener of an HTTP port and that of
// a non-HTTP host without addresses on the same port would share a name:
// a conflict as well.
func (r *Registry) plan() error {
	plans := map[netip.AddrPort]*listenerPlan{}
	claims := map[netip.AddrPort]*listenerPlan{} // who uses each address and port
	var order []netip.AddrPort
	for _, h := range r.hosts {
		addrs := h.Addresses
		if len(addrs) == 0 {
			addrs = []netip.Addr{netip.IPv4Unspecified()}
		}
		for _, p := range h.Ports {
			for _, a := range addrs {
				k := netip.AddrPortFrom(a, p.Number)
				c := claims[k]
				if c == nil {
					claims[k] = &listenerPlan{addr: k, protocol: p.Protocol, routes: []route{{host: h, port: p}}}
					continue
				}
				if err := c.conflict(h, p); err != nil {
					return err
				}
				c.routes = append(c.routes, route{host: h, port: p})
			}
			keys := addrs
			if p.Protocol == protocolHTTP {
				keys = []netip.Addr{netip.IPv4Unspecified()}
			}
			for _, a := range keys {
				k := netip.AddrPortFrom(a, p.Number)
				pl := plans[k]
				if pl == nil {
					pl = &listenerPlan{addr: k, protocol: p.Protocol}
					plans[k] = pl
					order = append(order, k)
				} else if pl.protocol != p.Protocol {
					first := pl.routes[0]
					return fmt.Errorf("%s: ports: %s port %d of %s conflicts with %s port %d of %s (%s): both need the wildcard listener %s (HTTP ports share it, one per port number; a host without addresses has its port there)",
						h.label, p.Protocol, p.Number, h.Name, first.port.Protocol, first.port.Number, first.host.Name, first.host.label, listenerName(pl))
				}
				pl.routes = append(pl.routes, route{host: h, port: p})
			}
		}
	}
	for _, k := range order {
		r.listeners = append(r.listeners, plans[k])
	}
	sort.SliceStable(r.listeners, func(i, j int) bool {
		return listenerName(r.listeners[i]) < listenerName(r.listeners[j])
	})
	return nil
}

// conflict says why host port p cannot use the address and port of c, or
// nil.
func (c *listenerPlan) conflict(h *host, p port) error {
	first := c.routes[0]
	where := c.addr.String()
	if c.addr.Addr().IsUnspecified() {
		where += " (no addresses: the wildcard listener)"
	}
	if c.protocol == p.Protocol && (p.Protocol == protocolTLS || p.Protocol == protocolHTTP) {
		for _, rt := range c.routes {
			if rt.host.Name == h.Name {
				return fmt.Errorf("%s: ports: %s %d is listed twice", h.label, h.Name, p.Number)
			}
		}
		return nil // SNI or the Host header tells them apart
	}
	return fmt.Errorf("%s: ports: %s port %d of %s conflicts with %s port %d of %s (%s) on %s; only TLS ports (told apart by SNI) or HTTP ports (told apart by Host) can share an address and port",
		h.label, p.Protocol, p.Number, h.Name, first.port.Protocol, first.port.Number, first.host.Name, first.host.label, where)
}

// listenerName is Istio's name of an outbound listener: <address>_<port>.
func listenerName(pl *listenerPlan) string {
	return fmt.Sprintf("%s_%d", pl.addr.Addr(), pl.addr.Port())
}
