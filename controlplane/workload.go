package controlplane

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
)

// workload is a pod of the mesh as the registry knows it: the endpoint
// entries with one IP, over every service. A sidecar whose node has that
// IP is this workload: its inbound side (virtualInbound's per-port chains,
// its peer authentication mode) comes from here, as istiod finds a proxy's
// service targets by its IPs.
type workload struct {
	IP             netip.Addr
	Name           string
	Namespace      string
	Sidecar        bool
	ServiceAccount string
	Mode           PeerAuthMode // "" = the profile's
	Ports          []inboundPort
	label          string // where it is first listed, for errors
}

// inboundPort is a port the workload serves a service port on (the
// endpoint's port, the target of the service port).
type inboundPort struct {
	Number   uint32
	Protocol string // protocolHTTP, or protocolTCP for TCP and TLS
	Host     *host  // the first service served on it
}

// mode is the workload's effective peer authentication mode under mesh.
func (w *workload) mode(mesh *MeshConfig) PeerAuthMode {
	if w.Mode != "" {
		return w.Mode
	}
	return mesh.peerAuth()
}

// peerAuth is the mesh-wide mode (PERMISSIVE when unset, as Istio).
func (m *MeshConfig) peerAuth() PeerAuthMode {
	if m.PeerAuthentication == "" {
		return Permissive
	}
	return m.PeerAuthentication
}

// collectWorkloads groups the service endpoints by IP. The entries of one
// workload must agree on its identity (namespace, sidecar, service
// account, mode). A port number the workload serves two service ports on
// keeps the first one's protocol, as Istio builds one inbound chain set
// per port.
func (r *Registry) collectWorkloads() error {
	r.workloads = map[netip.Addr]*workload{}
	for _, h := range r.hosts {
		if h.External {
			continue
		}
		for i := range h.Endpoints {
			e := &h.Endpoints[i]
			where := fmt.Sprintf("%s: endpoints[%d] (%s)", h.label, i, e.Address)
			w := r.workloads[e.IP]
			if w == nil {
				w = &workload{IP: e.IP, Name: e.Name, Namespace: h.Namespace, Sidecar: e.Sidecar,
					ServiceAccount: e.ServiceAccount, Mode: e.Mode, label: where}
				r.workloads[e.IP] = w
			} else {
				differ := func(field string, a, b any) error {
					return fmt.Errorf("%s: %s: %v, but the same workload is %v as %s; one IP is one pod, with one identity", where, field, a, b, w.label)
				}
				switch {
				case w.Namespace != h.Namespace:
					return differ("namespace", h.Namespace, w.Namespace)
				case w.Sidecar != e.Sidecar:
					return differ("sidecar", e.Sidecar, w.Sidecar)
				case w.ServiceAccount != e.ServiceAccount:
					return differ("serviceAccount", e.ServiceAccount, w.ServiceAccount)
				case w.Mode != e.Mode:
					return differ("peerAuthentication", orProfile(e.Mode), orProfile(w.Mode))
				}
			}
			for _, p := range h.Ports {
				if p.Protocol == protocolUDP {
					continue // inbound capture is TCP
				}
				proto := protocolTCP
				if p.Protocol == protocolHTTP {
					proto = protocolHTTP
				}
				n := e.PortFor(p)
				known := false
				for _, ip := range w.Ports {
					known = known || ip.Number == n
				}
				if !known {
					w.Ports = append(w.Ports, inboundPort{Number: n, Protocol: proto, Host: h})
				}
			}
		}
	}
	for _, w := range r.workloads {
		sort.Slice(w.Ports, func(i, j int) bool { return w.Ports[i].Number < w.Ports[j].Number })
	}
	return nil
}

func orProfile(m PeerAuthMode) string {
	if m == "" {
		return "unset (the profile's)"
	}
	return string(m)
}

// workloadOf is the workload of the first of ips the registry has, or nil.
func (r *Registry) workloadOf(ips []netip.Addr) *workload {
	for _, ip := range ips {
		if w := r.workloads[ip]; w != nil {
			return w
		}
	}
	return nil
}

// spiffeID is the identity istiod's CA gives a service account.
func spiffeID(trustDomain, ns, sa string) string {
	return "spiffe://" + trustDomain + "/ns/" + ns + "/sa/" + sa
}

// serviceAccounts are the SPIFFE IDs of h's endpoints, sorted and
// distinct: the identities a client accepts from h's servers (Istio's
// service accounts of a service, for match_subject_alt_names).
func (h *host) serviceAccounts(trustDomain string) []string {
	seen := map[string]bool{}
	var out []string
	for _, e := range h.Endpoints {
		id := spiffeID(trustDomain, h.Namespace, e.ServiceAccount)
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	sort.Strings(out)
	return out
}

// workloadMetadata is Istio's endpoint metadata istio.workload:
// <workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>,
// the canonical names from Istio's labels (app, version and their
// fallbacks), the service's name when none is set.
func workloadMetadata(h *host, e *endpoint) string {
	name := firstLabel(e.Labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
	if name == "" {
		name = h.Service
	}
	rev := firstLabel(e.Labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
	return strings.Join([]string{e.Name, h.Namespace, name, rev, istioClusterID}, ";")
}

// istioClusterID is Istio's default cluster id (ISTIO_META_CLUSTER_ID).
const istioClusterID = "Kubernetes"

func firstLabel(labels map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := labels[k]; v != "" {
			return v
		}
	}
	return ""
}
