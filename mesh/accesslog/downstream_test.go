package accesslog

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestDownstreamTLSFields: the client's SPIFFE ID and a failed
// downstream handshake's reason appear under Envoy's names when set, and
// not at all on plaintext.
func TestDownstreamTLSFields(t *testing.T) {
	var buf bytes.Buffer
	l := New(zerolog.New(&buf))
	l.Log(&Entry{Transport: "tcp", Start: time.Now(), DownstreamPeerURISAN: "spiffe://cluster.local/ns/default/sa/sleep"})
	l.Log(&Entry{Transport: "tcp", Start: time.Now(), Details: "downstream TLS handshake failed",
		DownstreamTransportFailureReason: "verify: the client sent no certificate (require_client_certificate)"})
	l.Log(&Entry{Transport: "tcp", Start: time.Now()})
	dec := json.NewDecoder(&buf)
	var lines []map[string]any
	for dec.More() {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			t.Fatal(err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3", len(lines))
	}
	if got := lines[0]["downstream_peer_uri_san"]; got != "spiffe://cluster.local/ns/default/sa/sleep" {
		t.Errorf("mTLS line: downstream_peer_uri_san = %v", got)
	}
	if got := lines[1]["downstream_transport_failure_reason"]; got != "verify: the client sent no certificate (require_client_certificate)" ||
		lines[1]["connection_termination_details"] != "downstream TLS handshake failed" {
		t.Errorf("failed handshake line: %v", lines[1])
	}
	for _, k := range []string{"downstream_peer_uri_san", "downstream_transport_failure_reason"} {
		if _, ok := lines[2][k]; ok {
			t.Errorf("plaintext line has %s", k)
		}
	}
}
