package caclient

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Identity is one issued workload identity. It is shared by every
// consumer and never changed once published: a new certificate is a new
// Identity.
type Identity struct {
	// ChainPEM is the certificate chain served as the "default" secret:
	// leaf, intermediates and root concatenated, as pilot-agent serves it.
	ChainPEM []byte
	// KeyPEM is the leaf's private key.
	KeyPEM []byte
	// RootPEM is the trust bundle for "ROOTCA": the chain's last element
	// (Istio's CA has no root-fetch call; the agent trusts the root that
	// signed it). In file-mounted mode, root-cert.pem.
	RootPEM []byte
	// Leaf is the parsed leaf certificate.
	Leaf *x509.Certificate
	// SPIFFEID is the leaf's URI SAN.
	SPIFFEID string
	// Serial is the leaf's serial number in lower-case hex.
	Serial string
	// NotAfter is when the leaf expires.
	NotAfter time.Time
	// Received is when the agent got it (rotation is timed from it).
	Received time.Time
}

// Source provides the current identity and says when it changes.
type Source interface {
	// Current is the identity in force, nil before the first one.
	Current() *Identity
	// Subscribe returns a channel that receives a value after each change
	// (coalesced: capacity one) and a function that ends the subscription.
	Subscribe() (<-chan struct{}, func())
	// Err is why the last attempt to get an identity failed, nil if it
	// succeeded: readiness reports it while no identity is in force.
	Err() error
}

// publisher holds the current identity and its subscribers; Client and
// FileSource embed it.
type publisher struct {
	mu   sync.Mutex
	cur  *Identity
	err  error
	subs map[chan struct{}]struct{}
}

func (p *publisher) Current() *Identity {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur
}

func (p *publisher) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *publisher) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	p.mu.Lock()
	if p.subs == nil {
		p.subs = map[chan struct{}]struct{}{}
	}
	p.subs[ch] = struct{}{}
	p.mu.Unlock()
	return ch, func() {
		p.mu.Lock()
		delete(p.subs, ch)
		p.mu.Unlock()
	}
}

func (p *publisher) publish(id *Identity) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cur, p.err = id, nil
	for ch := range p.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (p *publisher) fail(err error) {
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
}

// newIdentity checks a chain (leaf first) against keyPEM and builds the
// Identity; rootPEM nil means the chain's last element. what names the
// origin in errors.
func newIdentity(what string, chain [][]byte, keyPEM, rootPEM []byte, now time.Time) (*Identity, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("%s: no certificate", what)
	}
	var all []byte
	var leaf *x509.Certificate
	for i, c := range chain {
		block, _ := pem.Decode(c)
		if block == nil || block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%s: element %d is not a PEM CERTIFICATE", what, i)
		}
		if i == 0 {
			var err error
			if leaf, err = x509.ParseCertificate(block.Bytes); err != nil {
				return nil, fmt.Errorf("%s: leaf: %v", what, err)
			}
		}
		all = append(all, c...)
		if len(c) > 0 && c[len(c)-1] != '\n' {
			all = append(all, '\n')
		}
	}
	if rootPEM == nil {
		rootPEM = chain[len(chain)-1]
	}
	if _, err := tlsKeyPair(all, keyPEM); err != nil {
		return nil, fmt.Errorf("%s: the key does not match the leaf certificate: %v", what, err)
	}
	id := &Identity{ChainPEM: all, KeyPEM: keyPEM, RootPEM: rootPEM, Leaf: leaf,
		Serial: hex.EncodeToString(leaf.SerialNumber.Bytes()), NotAfter: leaf.NotAfter, Received: now}
	if len(leaf.URIs) > 0 {
		id.SPIFFEID = leaf.URIs[0].String()
	}
	return id, nil
}

// splitPEM splits a PEM bundle into one element per certificate.
func splitPEM(b []byte) [][]byte {
	var out [][]byte
	for {
		block, rest := pem.Decode(b)
		if block == nil {
			return out
		}
		if block.Type == "CERTIFICATE" {
			out = append(out, pem.EncodeToMemory(block))
		}
		b = rest
	}
}

var errNoChain = errors.New("invalid empty CertChain")
