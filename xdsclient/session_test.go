package xdsclient

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// sent is one request a session sent through fakeWire.
type sent struct {
	kind kind
	acks []held
	nack error
}

// fakeWire records requests; responses are fed to the session directly.
type fakeWire struct{ sent []sent }

func (f *fakeWire) recv() (*response, error) { select {} }
func (f *fakeWire) observe(*response)        {}
func (f *fakeWire) send(k kind, acks []held, nack error) error {
	f.sent = append(f.sent, sent{k, acks, nack})
	return nil
}

func (f *fakeWire) last(k kind) (sent, bool) {
	for i := len(f.sent) - 1; i >= 0; i-- {
		if f.sent[i].kind == k {
			return f.sent[i], true
		}
	}
	return sent{}, false
}

// A response that does not decode is NACKed with an error naming the resource, and
// the accepted state does not move.
func TestDecodeErrorIsNACKed(t *testing.T) {
	for _, delta := range []bool{false, true} {
		rec := &recorder{t: t}
		c := New(Config{Server: "unused:1", Delta: delta, Log: zerolog.Nop()}, rec)
		s := newSession(c, context.Background())
		fw := &fakeWire{}
		s.w = fw
		s.start()

		s.handle(&response{kind: kindCluster, nonce: "1", version: "v1", delta: delta, resources: []rawResource{
			{name: "c1", any: xdstest.MustAny(t, xdstest.StaticCluster("c1", netip.MustParseAddrPort("10.0.0.1:80")))},
		}})
		if got, ok := fw.last(kindCluster); !ok || got.nack != nil || len(got.acks) != 1 || got.acks[0].nonce != "1" {
			t.Fatalf("delta=%v: CDS not ACKed: %+v", delta, got)
		}
		before := c.Accepted()
		if before == nil || before.Clusters["c1"] == nil {
			t.Fatalf("delta=%v: not applied: %s", delta, describe(before))
		}
		if _, ok := fw.last(kindListener); !ok {
			t.Fatalf("delta=%v: LDS not requested after the clusters were applied", delta)
		}

		s.handle(&response{kind: kindListener, nonce: "2", version: "v1", delta: delta, resources: []rawResource{
			{name: "l1", any: &anypb.Any{TypeUrl: ListenerType, Value: []byte{0x0a, 0xff}}},
		}})
		got, _ := fw.last(kindListener)
		if got.nack == nil || !strings.Contains(got.nack.Error(), `listener "l1"`) || len(got.acks) != 1 || got.acks[0].nonce != "2" {
			t.Errorf("delta=%v: want a NACK of nonce 2 naming listener l1, got %+v", delta, got)
		}
		if c.Accepted() != before || len(rec.all()) != 1 {
			t.Errorf("delta=%v: accepted state changed after a decode error", delta)
		}
		if st := c.Stats(); st[StatLDSUpdateRejected] != 1 || st[StatCDSUpdateSuccess] != 1 {
			t.Errorf("delta=%v: stats = %v", delta, st)
		}
	}
}
