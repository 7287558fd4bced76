package rbac

import "crypto/tls"

// PeerOf is the RBAC peer of a TLS connection: the verified leaf's URI
// SANs, DNS SANs and subject; nil without TLS or without a peer
// certificate (authenticated then never matches). It allocates: call it
// once per connection, after the handshake, not per request.
func PeerOf(cs *tls.ConnectionState) *Peer {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return nil
	}
	c := cs.PeerCertificates[0]
	p := &Peer{DNSSANs: c.DNSNames, Subject: c.Subject.String()}
	for _, u := range c.URIs {
		p.URISANs = append(p.URISANs, u.String())
	}
	return p
}
