package caclient

import (
	"testing"
	"time"

	"github.com/meshtun/meshtun/controlplane/ca"
)

// BenchmarkCSRAndSign is the cost of one issuance without the network: a
// new key and CSR (the agent's share) and the CA's signature (the control
// plane's), for both key types; RSA key generation dominates.
func BenchmarkCSRAndSign(b *testing.B) {
	a, err := ca.LoadOrCreate(b.TempDir(), "cluster.local")
	if err != nil {
		b.Fatal(err)
	}
	const id = "spiffe://cluster.local/ns/shop/sa/cart"
	for _, kt := range []KeyType{RSA, ECDSA} {
		b.Run(kt.String(), func(b *testing.B) {
			for b.Loop() {
				_, csr, err := newKeyAndCSR(kt, 2048, id)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := a.Sign(csr, id, time.Hour); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
