package accesslog

import (
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func benchEntry() Entry {
	return Entry{Transport: "tcp", Direction: "outbound", Start: time.Now(),
		DownstreamLocal: netip.MustParseAddrPort("10.77.0.1:7777"), DownstreamPeer: netip.MustParseAddrPort("10.77.0.2:40000"),
		UpstreamHost: netip.MustParseAddrPort("10.77.0.1:7777"), UpstreamLocal: netip.MustParseAddrPort("10.77.0.2:40002"),
		UpstreamCluster: "PassthroughCluster", BytesReceived: 64, BytesSent: 64}
}

// BenchmarkLogJSON is one tcp flow's access line in the JSON format.
func BenchmarkLogJSON(b *testing.B) {
	l := New(zerolog.New(io.Discard).With().Timestamp().Logger())
	e := benchEntry()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		l.Log(&e)
	}
}

// BenchmarkLogConsole is the same line through zerolog's console writer
// (the proxy's default --log-format), which re-parses every JSON line.
func BenchmarkLogConsole(b *testing.B) {
	l := New(zerolog.New(zerolog.ConsoleWriter{Out: io.Discard, TimeFormat: time.RFC3339Nano}).With().Timestamp().Logger())
	e := benchEntry()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		l.Log(&e)
	}
}

// BenchmarkLogDisabled is the cost per flow when the level drops the line.
func BenchmarkLogDisabled(b *testing.B) {
	l := New(zerolog.New(io.Discard).Level(zerolog.WarnLevel))
	e := benchEntry()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		l.Log(&e)
	}
}
