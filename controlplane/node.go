package controlplane

import (
	"fmt"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// nodeInfo is a connected proxy as the generator sees it.
type nodeInfo struct {
	ID        string
	IPs       []netip.Addr
	Pod       string // <pod>.<namespace> from the node id
	Namespace string
	// Identity is set when the node came over the TLS port with a token:
	// its agent then has a certificate from this control plane's CA (the
	// agent's identity mode ca), so the node gets Istio's TLS shapes.
	Identity bool
}

// parseNode reads an Istio sidecar node: the id is
// sidecar~<IP>~<pod>.<namespace>~<namespace>.svc.cluster.local; the IPs are
// node.metadata.INSTANCE_IPS (comma separated) when set, else the id's IP,
// as istiod reads them.
func parseNode(n *corev3.Node) (nodeInfo, error) {
	id := n.GetId()
	parts := strings.Split(id, "~")
	if len(parts) != 4 {
		return nodeInfo{}, fmt.Errorf("node id %q: want sidecar~<IP>~<pod>.<namespace>~<namespace>.svc.cluster.local", id)
	}
	if parts[0] != "sidecar" {
		return nodeInfo{}, fmt.Errorf("node id %q: proxy type %q is not supported; valid choices: sidecar", id, parts[0])
	}
	out := nodeInfo{ID: id, Pod: parts[2]}
	if _, ns, ok := strings.Cut(parts[2], "."); ok {
		out.Namespace = ns
	}
	if v := n.GetMetadata().GetFields()["INSTANCE_IPS"].GetStringValue(); v != "" {
		for _, s := range strings.Split(v, ",") {
			ip, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return nodeInfo{}, fmt.Errorf("node %q: metadata INSTANCE_IPS: %q is not an IP address", id, s)
			}
			out.IPs = append(out.IPs, ip.Unmap())
		}
		return out, nil
	}
	ip, err := netip.ParseAddr(parts[1])
	if err != nil {
		return nodeInfo{}, fmt.Errorf("node id %q: %q is not an IP address", id, parts[1])
	}
	out.IPs = []netip.Addr{ip.Unmap()}
	return out, nil
}

// class is the node's class under reg: a node with an identity whose IP is
// a workload of reg is that workload.
func (n nodeInfo) class(reg *Registry) nodeClass {
	c := nodeClass{ns: n.Namespace, mtls: n.Identity}
	if n.Identity {
		if w := reg.workloadOf(n.IPs); w != nil {
			c.workload = w.IP
		}
	}
	for _, ip := range n.IPs {
		if ip.Is4() {
			c.v4 = true
		} else {
			c.v6 = true
		}
	}
	if !c.v4 && !c.v6 {
		c.v4 = true
	}
	return c
}
