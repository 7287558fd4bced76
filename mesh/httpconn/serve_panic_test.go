package httpconn

import (
	"bytes"
	"io"
	"log"
	"testing"
)

// TestServerLogReportsPanicsOnly: net/http's recovered handler panics
// reach stderr; its routine client-side reports do not.
func TestServerLogReportsPanicsOnly(t *testing.T) {
	var buf bytes.Buffer
	w := panicOnly{&buf}
	w.Write([]byte("http2: server: error reading preface from client 10.0.0.1:1: EOF\n"))
	if buf.Len() != 0 {
		t.Fatalf("a routine report was passed on: %q", buf.String())
	}
	w.Write([]byte("http: panic serving 10.0.0.1:1: runtime error: invalid memory address\ngoroutine 1 [running]:\n"))
	if !bytes.Contains(buf.Bytes(), []byte("meshtun: BUG: http: panic serving")) || !bytes.Contains(buf.Bytes(), []byte("goroutine 1")) {
		t.Fatalf("the panic was not reported with its stack: %q", buf.String())
	}
}

// discardLog silences the test upstreams' net/http servers.
var discardLog = log.New(io.Discard, "", 0)
