//go:build linux

package integration

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// appToken mints a token for default/app with the control plane whose
// state folder is state.
func appToken(t *testing.T, topo *topology, state string) string {
	t.Helper()
	code, tok, stderr := meshtunCmd(t, topo.Services, "controlplane", "token", "--namespace", "default", "--service-account", "app", "--state-dir", state)
	if code != 0 {
		t.Fatalf("controlplane token: %d %s", code, stderr)
	}
	return strings.TrimSpace(tok)
}

// recvDefault receives one SotW SDS response on stream, checks it is the
// one secret `default`, ACKs it (as Envoy does) and returns its leaf.
func recvDefault(t *testing.T, stream secretv3.SecretDiscoveryService_StreamSecretsClient) *x509.Certificate {
	t.Helper()
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("SDS default: %v", err)
	}
	if len(resp.GetResources()) != 1 {
		t.Fatalf("SDS default: %d resources, want 1", len(resp.GetResources()))
	}
	var s tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&s); err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if s.GetName() != "default" || blk == nil || len(s.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) == 0 {
		t.Fatalf("SDS default: %v", &s)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{"default"},
		VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatalf("SDS ACK: %v", err)
	}
	return leaf
}

// TestAgentIdentityRotation is issue 13's test 4 on the agent: with
// SECRET_TTL=60s the certificate is re-issued at 50% ± 1% of its
// lifetime; an SDS stream opened before the rotation is pushed the new
// `default` (new serial, same SPIFFE ID), and a TCP flow through the
// captured pod opened before it keeps working across it.
func TestAgentIdentityRotation(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	v := vip(topo, false, 30)
	const ttl = 60 * time.Second
	ag, _, socket := identityAgentOn(t, topo, registryDoc(serviceDoc("reviews", v, 9080, "TCP", topo.SvcV4)),
		[]string{"SECRET_TTL=" + ttl.String()}, func(state string) string { return appToken(t, topo, state) })
	untilReadiness(t, topo, ag, 20*time.Second, "200", func(code int, _ string) bool { return code == 200 })

	// The flow, opened (and used) before the rotation, is held across it.
	flow := dialUntil(t, topo, ap(v, 9080), 10*time.Second)
	defer flow.Close()

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{"default"}}); err != nil {
		t.Fatal(err)
	}
	first := recvDefault(t, stream)
	// The CA signs for exactly the TTL asked (the CA's root outlives it),
	// so NotAfter − TTL is when the first certificate was issued (to the
	// second: certificate times have no finer grain).
	issued := first.NotAfter.Add(-ttl)
	if life := first.NotAfter.Sub(first.NotBefore); life < ttl {
		t.Fatalf("first certificate valid %v, want at least SECRET_TTL %v", life, ttl)
	}

	second := recvDefault(t, stream)
	at := time.Since(issued)
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatalf("SDS pushed default again with the same serial %x", first.SerialNumber)
	}
	if len(second.URIs) != 1 || len(first.URIs) != 1 || second.URIs[0].String() != first.URIs[0].String() ||
		first.URIs[0].String() != "spiffe://cluster.local/ns/default/sa/app" {
		t.Errorf("SPIFFE IDs: first %v, rotated %v; want spiffe://cluster.local/ns/default/sa/app for both", first.URIs, second.URIs)
	}
	// 50% ± 1% of 60 s is 29.4–30.6 s; the bounds allow the second-grained
	// issue time and a slow machine, and exclude a rotation at expiry.
	if at < 25*time.Second || at > 40*time.Second {
		t.Errorf("new serial pushed %v after the first was issued, want 25s–40s (rotation at 50%% of %v)", at.Round(time.Millisecond), ttl)
	}
	t.Logf("rotated %v after issue: serial %x → %x", at.Round(time.Millisecond), first.SerialNumber, second.SerialNumber)

	if err := pingPong(flow, []byte("after the rotation")); err != nil {
		t.Fatalf("the flow opened before the rotation broke across it: %v", err)
	}
	serial := hex.EncodeToString(second.SerialNumber.Bytes())
	if !ag.waitLine(func(l string) bool {
		return logMessage(l) == "workload certificate issued" && strings.Contains(l, serial)
	}, 5*time.Second) {
		t.Errorf("the agent did not log the rotated certificate (serial %s)", serial)
	}
	// New flows work on the rotated certificate as well.
	waitServes(t, topo, ap(v, 9080))
}

// TestAgentIdentityWrongRoot is issue 13's test 3, wrong root: the agent
// given a root-cert.pem that did not sign the CA's certificate is not
// ready, and its readiness and log say the TLS to the CA failed,
// verified against that root file.
func TestAgentIdentityWrongRoot(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(root, otherRoot(t), 0o644); err != nil {
		t.Fatal(err)
	}
	ag, _, _ := identityAgentOn(t, topo, registryDoc(), nil, func(state string) string { return appToken(t, topo, state) },
		"--ca-root-file", root)
	want := "TLS to the CA at " + ap(topo.GwV4, 15012)
	var last string
	untilReadiness(t, topo, ag, 15*time.Second, "the TLS failure", func(code int, body string) bool {
		last = body
		return code == 503 && strings.Contains(body, "secret default not issued yet: "+want) &&
			strings.Contains(body, "verified against the root file "+root)
	})
	if !strings.Contains(last, "x509:") {
		t.Errorf("readiness does not give the verification error: %s", last)
	}
	if !ag.waitLine(func(l string) bool {
		return strings.Contains(l, want) && strings.Contains(l, "verified against the root file "+root)
	}, 5*time.Second) {
		t.Errorf("the agent's log does not name the TLS failure and %s:\n%s", root, strings.Join(ag.logLines(), "\n"))
	}
	// Still not ready a moment later: a retry does not hide the failure.
	time.Sleep(time.Second)
	if code, body := readiness(topo); code != 503 || !strings.Contains(body, root) {
		t.Errorf("readiness 1s later: %d %s", code, body)
	}
}

// otherRoot is a self-signed CA certificate (PEM) that signed nothing the
// control plane has.
func otherRoot(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
