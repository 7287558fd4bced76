//go:build linux

package integration

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// identityAgent starts `meshtun controlplane` with its CA on GwV4:15012
// and `meshtun agent` in the pod, its discovery address on that TLS port,
// with token as its istio-token; it returns the agent, the token file and
// the SDS socket.
func identityAgent(t *testing.T, topo *topology, token func(state string) string) (*agentRun, string, string) {
	t.Helper()
	return identityAgentOn(t, topo, registryDoc(), nil, token)
}

// identityAgentOn is identityAgent with the control plane serving
// registry, env added to the agent's environment and extra to its flags
// (after the defaults: a flag given again there wins).
func identityAgentOn(t *testing.T, topo *topology, registry string, env []string, token func(state string) string, extra ...string) (*agentRun, string, string) {
	t.Helper()
	cp := startMeshtunControlPlane(t, topo, registry, "--secure-address", ap(topo.GwV4, 15012))
	state := filepath.Dir(cp.tokenFile)
	dir := t.TempDir()
	tokenFile, socket := filepath.Join(dir, "tokens", "istio-token"), filepath.Join(dir, "workload-spiffe-uds", "socket")
	if err := os.MkdirAll(filepath.Dir(tokenFile), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte(token(state)), 0o600); err != nil {
		t.Fatal(err)
	}
	ag := startAgentNoWait(t, topo, agentEnv(append([]string{"ECC_SIGNATURE_ALGORITHM=ECDSA"}, env...)...), append([]string{"--discovery-address", ap(topo.GwV4, 15012),
		"--ca-root-file", filepath.Join(state, "ca", "root-cert.pem"), "--token-file", tokenFile, "--sds-socket", socket}, extra...)...)
	return ag, tokenFile, socket
}

// untilReadiness polls /healthz/ready until cond holds on its answer,
// failing after d with the last one.
func untilReadiness(t *testing.T, topo *topology, ag *agentRun, d time.Duration, what string, cond func(int, string) bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		code, body := readiness(topo)
		if cond(code, body) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness not %s after %v: %d %s; agent log:\n%s", what, d, code, body, strings.Join(ag.logLines(), "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAgentIdentityFromControlPlane is issue 13's test 2 on the agent: with
// a token minted for default/app, the agent gets from the control plane's
// CA (port 15012, TLS) a certificate whose only SAN is the token's SPIFFE
// ID and serves it over SDS, its proxy gets its configuration by ADS over
// the same TLS port with the same token, and the pod is ready; once the
// control plane's configuration references default and ROOTCA, the
// proxy's /certs and /config_dump (SecretsConfigDump) show the issued
// certificate.
func TestAgentIdentityFromControlPlane(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	// A meshed service (its endpoint labelled tlsMode istio): the control
	// plane's clusters and inbound chains then reference default and
	// ROOTCA, so the proxy fetches both from the agent.
	reg := registryDoc(meshServiceDoc("reviews", vip(topo, false, 30), []meshPortDoc{{"tcp", 9080, "TCP"}}, true, topo.SvcV4))
	ag, _, socket := identityAgentOn(t, topo, reg, nil, func(state string) string {
		code, tok, stderr := meshtunCmd(t, topo.Services, "controlplane", "token", "--namespace", "default", "--service-account", "app", "--state-dir", state)
		if code != 0 {
			t.Fatalf("controlplane token: %d %s", code, stderr)
		}
		return strings.TrimSpace(tok)
	})
	// Ready needs the certificate and the proxy's first LDS and CDS, which
	// only ADS over 15012 can bring.
	untilReadiness(t, topo, ag, 20*time.Second, "200", func(code int, _ string) bool { return code == 200 })

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
		ResourceNames: []string{"default"}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("SDS default: %v", err)
	}
	if len(resp.GetResources()) != 1 {
		t.Fatalf("SDS default: %d resources", len(resp.GetResources()))
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
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/default/sa/app" || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("leaf SANs: URIs %v DNS %v IPs %v; want only spiffe://cluster.local/ns/default/sa/app", leaf.URIs, leaf.DNSNames, leaf.IPAddresses)
	}

	// The proxy has Istio's sds-grpc cluster, a pipe to the agent's SDS
	// socket, for the TLS contexts that will name it.
	code, body, err := httpGetIn(topo.Pod, "127.0.0.1:15000", "/clusters", 5*time.Second)
	if err != nil || code != 200 || !strings.Contains(body, "sds-grpc::"+socket+"::") {
		t.Errorf("/clusters: %d %v, want a sds-grpc host at %s:\n%.3000s", code, err, socket, body)
	}
	// The proxy holds the issued certificate: /certs (Envoy's JSON) and
	// /config_dump's SecretsConfigDump (istioctl proxy-config secret)
	// show it, with its serial and SPIFFE ID, the key redacted.
	serial := hex.EncodeToString(leaf.SerialNumber.Bytes())
	xdstest.Eventually(t, 15*time.Second, "/certs with the issued certificate "+serial, func() bool {
		return certSerial(t, topo) == serial
	})
	var certs adminv3.Certificates
	if err := protojson.Unmarshal([]byte(adminGet(t, topo, "/certs")), &certs); err != nil {
		t.Fatalf("/certs: %v", err)
	}
	foundCert := false
	for _, c := range certs.GetCertificates() {
		for _, d := range c.GetCertChain() {
			if d.GetSerialNumber() == serial {
				foundCert = len(d.GetSubjectAltNames()) == 1 && d.GetSubjectAltNames()[0].GetUri() == "spiffe://cluster.local/ns/default/sa/app" &&
					len(c.GetCaCert()) > 0
			}
		}
	}
	if !foundCert {
		t.Errorf("/certs: the issued certificate %s without its one SPIFFE ID or without the CA certificate:\n%s", serial, adminGet(t, topo, "/certs"))
	}
	cd := &adminv3.ConfigDump{}
	if err := protojson.Unmarshal([]byte(adminGet(t, topo, "/config_dump")), cd); err != nil {
		t.Fatalf("/config_dump: %v", err)
	}
	var sd *adminv3.SecretsConfigDump
	for _, a := range cd.GetConfigs() {
		if m := (&adminv3.SecretsConfigDump{}); a.UnmarshalTo(m) == nil {
			sd = m
		}
	}
	if sd == nil {
		t.Fatalf("/config_dump has no SecretsConfigDump")
	}
	dumped := map[string]*tlsv3.Secret{}
	for _, ds := range sd.GetDynamicActiveSecrets() {
		sec := &tlsv3.Secret{}
		if err := ds.GetSecret().UnmarshalTo(sec); err != nil {
			t.Fatal(err)
		}
		dumped[ds.GetName()] = sec
	}
	if d := dumped["default"]; d == nil {
		t.Errorf("SecretsConfigDump has no active default: %v", sd)
	} else {
		blk, _ := pem.Decode(d.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
		if blk == nil || !bytes.Equal(blk.Bytes, leaf.Raw) {
			t.Errorf("SecretsConfigDump default: not the issued certificate %s", serial)
		}
		if k := string(d.GetTlsCertificate().GetPrivateKey().GetInlineBytes()); k != "[redacted]" {
			t.Errorf("SecretsConfigDump default: private key %q, want [redacted]", k)
		}
	}
	if r := dumped["ROOTCA"]; r == nil || len(r.GetValidationContext().GetTrustedCa().GetInlineBytes()) == 0 {
		t.Errorf("SecretsConfigDump has no ROOTCA with a trusted CA: %v", r)
	}
}

// TestAgentIdentityBadToken is issue 13's test 3, bad token: readiness
// says the CA rejected the token and names the file, and so does the log;
// the pod is not ready.
func TestAgentIdentityBadToken(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	ag, tokenFile, _ := identityAgent(t, topo, func(string) string { return "mt1.not.a-token" })
	want := "secret default not issued yet: CA rejected the token (file " + tokenFile
	untilReadiness(t, topo, ag, 15*time.Second, "the token's rejection", func(code int, body string) bool {
		return code == 503 && strings.Contains(body, want)
	})
	if !ag.waitLine(func(l string) bool { return strings.Contains(l, "CA rejected the token (file "+tokenFile) }, 5*time.Second) {
		t.Errorf("the agent's log does not say the CA rejected %s:\n%s", tokenFile, strings.Join(ag.logLines(), "\n"))
	}
}

// startCA runs a second `meshtun controlplane` in the services namespace
// as the CA only (its ADS ports unused) on GwV4:15012, keeping its root in
// state, and waits until its TLS port serves.
func startCA(t *testing.T, topo *topology, state string) *proxyProc {
	t.Helper()
	args := []string{"netns", "exec", topo.Services, meshtunBin(t), "controlplane", "--log-format", "json", "--log-level", "debug",
		"--registry", "", "--state-dir", state, "--xds-address", ap(topo.GwV4, 15011), "--api-address", "127.0.0.1:15015",
		"--secure-address", ap(topo.GwV4, 15012)}
	p := startProc(t, "meshtun controlplane (CA)", args, nil, syscall.SIGTERM)
	if !p.waitLine(func(l string) bool { return strings.HasPrefix(logMessage(l), "CA and ADS over TLS ready") }, 10*time.Second) {
		t.Fatalf("CA not ready after 10s (exited: %v %v); log:\n%s", p.exited(), p.waitErr, strings.Join(p.logLines(), "\n"))
	}
	return p
}

// TestAgentIdentityCADownAtStart is issue 13's test 3, CA down at start:
// the agent (xDS on plaintext 15010, CA_ADDR on the CA's 15012) is not
// ready and names the missing secret while the CA is down, and is ready
// within 2 s of the CA coming up.
func TestAgentIdentityCADownAtStart(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startMeshtunControlPlane(t, topo, registryDoc(), "--secure-address", "off")
	state := filepath.Join(t.TempDir(), "ca-state")
	startCA(t, topo, state).stop() // its root, kept in state, is the agent's root-cert.pem
	code, tok, stderr := meshtunCmd(t, topo.Services, "controlplane", "token", "--namespace", "default", "--service-account", "app", "--state-dir", state)
	if code != 0 {
		t.Fatalf("controlplane token: %d %s", code, stderr)
	}
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "istio-token")
	if err := os.WriteFile(tokenFile, []byte(strings.TrimSpace(tok)), 0o600); err != nil {
		t.Fatal(err)
	}
	ag := startAgentNoWait(t, topo, agentEnv("ECC_SIGNATURE_ALGORITHM=ECDSA", "CA_ADDR="+ap(topo.GwV4, 15012)),
		"--discovery-address", ap(topo.GwV4, 15010), "--ca-root-file", filepath.Join(state, "ca", "root-cert.pem"),
		"--token-file", tokenFile, "--sds-socket", filepath.Join(dir, "socket"))
	untilReadiness(t, topo, ag, 15*time.Second, "waiting for the certificate", func(code int, body string) bool {
		return code == 503 && strings.HasPrefix(body, "secret default not issued yet: CA at "+ap(topo.GwV4, 15012))
	})
	// Several failed attempts: the backoff would have grown past 2 s.
	time.Sleep(4 * time.Second)
	if code, body := readiness(topo); code != 503 || !strings.Contains(body, "secret default not issued yet") {
		t.Fatalf("readiness with the CA down: %d %s", code, body)
	}

	startCA(t, topo, state)
	up := time.Now()
	untilReadiness(t, topo, ag, 10*time.Second, "200", func(code int, _ string) bool { return code == 200 })
	if took := time.Since(up); took > 2*time.Second {
		t.Errorf("ready %v after the CA came up, want within 2s", took.Round(time.Millisecond))
	}
}
