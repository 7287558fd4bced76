package accesslog

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// The upstream TLS fields appear under Istio's names when set, and not
// at all over plaintext.
func TestUpstreamTLSFields(t *testing.T) {
	var buf bytes.Buffer
	l := New(zerolog.New(&buf))
	l.Log(&Entry{Transport: "tcp", Start: time.Now(), ResponseFlags: "UF",
		UpstreamTransportFailureReason: "verify SAN: spiffe://x not in match_subject_alt_names"})
	l.Log(&Entry{Transport: "tcp", Start: time.Now(), UpstreamPeerURISAN: "spiffe://cluster.local/ns/default/sa/httpbin"})
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
	if got := lines[0]["upstream_transport_failure_reason"]; got != "verify SAN: spiffe://x not in match_subject_alt_names" || lines[0]["response_flags"] != "UF" {
		t.Errorf("failed handshake line: %v", lines[0])
	}
	if got := lines[1]["upstream_peer_uri_san"]; got != "spiffe://cluster.local/ns/default/sa/httpbin" {
		t.Errorf("TLS line: upstream_peer_uri_san = %v", got)
	}
	for _, k := range []string{"upstream_peer_uri_san", "upstream_transport_failure_reason"} {
		if _, ok := lines[2][k]; ok {
			t.Errorf("plaintext line has %s", k)
		}
	}
}
