// Package ca is the embedded control plane's certificate authority, in
// istiod's role: it serves istio.v1.auth.IstioCertificateService/
// CreateCertificate (istio.io/api/security/v1alpha1) on the control
// plane's TLS port, so a sidecar agent written for istiod (pilot-agent, or
// meshtun's agent/caclient) gets its workload certificate from it unchanged.
//
// What it copies from istiod, and why:
//
//   - The caller is authenticated by a bearer token (gRPC metadata
//     "authorization: Bearer <token>"), and the certificate's one SAN is
//     the token's identity spiffe://<trust domain>/ns/<ns>/sa/<sa>, never
//     what the CSR asks for: the CSR only carries the public key
//     (https://github.com/istio/istio/blob/master/security/pkg/server/ca/server.go).
//     Tokens are meshtun's own (tokens.go): signed with ed25519, per
//     namespace and service account, with an expiry; istiod checks
//     Kubernetes service account tokens by TokenReview instead.
//   - The leaf is what istiod issues (authority.go): KeyUsage
//     DigitalSignature|KeyEncipherment, ExtKeyUsage ServerAuth+ClientAuth,
//     a critical URI SAN and an empty subject, NotBefore back-dated 2
//     minutes for clock skew, NotAfter clamped to the CA's; the response
//     chain is [leaf, intermediates…, root], root last, because the agent
//     takes its trust bundle (ROOTCA) from the last element.
//   - The root is generated once and kept in the state folder, so
//     certificates survive a restart; or it is taken from istiod's
//     "cacerts" files (ca-cert.pem, ca-key.pem, root-cert.pem,
//     cert-chain.pem) for users with their own root.
//   - Errors are istiod's: Unauthenticated "request authenticate failure"
//     for a missing or bad token, InvalidArgument for a bad CSR or TTL.
package ca
