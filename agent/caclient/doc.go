// Package caclient gives the agent its workload identity: a key and a
// certificate chain, the "default" and "ROOTCA" secrets its SDS server
// hands the proxy.
//
// Two sources, both an Identity Source:
//
//   - Client is pilot-agent's CA client
//     (https://github.com/istio/istio/blob/master/security/pkg/nodeagent/caclient/providers/citadel/client.go):
//     a new key (RSA 2048, or ECDSA P-256 with ECC_SIGNATURE_ALGORITHM=ECDSA)
//     and a CSR with one critical URI SAN spiffe://<TRUST_DOMAIN>/ns/<ns>/sa/<sa>,
//     sent to istio.v1.auth.IstioCertificateService/CreateCertificate at
//     CA_ADDR over TLS verified against ./var/run/secrets/istio/root-cert.pem,
//     with "authorization: Bearer <token>" re-read from
//     ./var/run/secrets/tokens/istio-token on every call (Kubernetes rotates
//     the projected token under the agent) and "ClusterID". It re-issues at
//     50% ± 1% of the certificate's lifetime (secretcache.go rotateTime) and,
//     when the CA fails, retries forever with a bounded backoff while the
//     current certificate keeps serving until it expires.
//   - FileSource is the file-mounted mode (FILE_MOUNTED_CERTS): an external
//     CA writes /etc/certs/{cert-chain,key,root-cert}.pem and the agent
//     serves them, re-read when they change.
//
// The SDS server consumes a Source: Current for the identity in force, and
// Subscribe for a signal each time it changes (then Current again), so a
// slow consumer never blocks the source and always reads the newest.
package caclient
