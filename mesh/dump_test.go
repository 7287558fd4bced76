package mesh

import (
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/xdsclient"
)

// The dump keeps a resource's version and time while it stays the same
// (same message, or an equal one re-sent), gives a changed or new one the
// update's, and drains the listeners changed or removed.
func TestRecorderVersions(t *testing.T) {
	// Version 1 of a listener differs from version 0 in one field.
	l := func(name string, version int) *listenerv3.Listener {
		return &listenerv3.Listener{Name: name, StatPrefix: name, ContinueOnListenerFiltersTimeout: version == 1}
	}
	var r recorder
	t1, t2 := time.Unix(100, 0), time.Unix(200, 0)
	a, b, gone := l("a", 0), l("b", 0), l("gone", 0)
	state := func(v string, ls ...*listenerv3.Listener) *xdsclient.Resources {
		m := map[string]*listenerv3.Listener{}
		for _, x := range ls {
			m[x.GetName()] = x
		}
		return &xdsclient.Resources{Listeners: m, Versions: map[string]string{xdsclient.ListenerType: v}}
	}
	r.next(nil, state("1", a, b, gone, l("same", 0)), time.Minute, t1)
	d := r.next(nil, state("2", a, l("b", 1), l("same", 0), l("new", 0)), time.Minute, t2)
	want := map[string]struct {
		v string
		t time.Time
	}{"a": {"1", t1}, "b": {"2", t2}, "same": {"1", t1}, "new": {"2", t2}}
	if len(d.Listeners) != len(want) {
		t.Fatalf("%d listeners dumped, want %d", len(d.Listeners), len(want))
	}
	for i, rec := range d.Listeners {
		w := want[rec.Name]
		if rec.Version != w.v || !rec.LastUpdated.Equal(w.t) {
			t.Errorf("%s: version %q at %v, want %q at %v", rec.Name, rec.Version, rec.LastUpdated, w.v, w.t)
		}
		if i > 0 && d.Listeners[i-1].Name >= rec.Name {
			t.Errorf("listeners not sorted: %q before %q", d.Listeners[i-1].Name, rec.Name)
		}
	}
	var draining []string
	for _, rec := range d.DrainingListeners {
		draining = append(draining, rec.Name)
		if !rec.DrainUntil.Equal(t2.Add(time.Minute)) || rec.Version != "1" {
			t.Errorf("draining %s: version %q until %v, want the old version 1 until %v", rec.Name, rec.Version, rec.DrainUntil, t2.Add(time.Minute))
		}
	}
	if len(draining) != 2 || draining[0] != "b" || draining[1] != "gone" {
		t.Errorf("draining %v, want [b gone]", draining)
	}
	if d3 := r.next(nil, state("3", a), time.Minute, t2.Add(2*time.Minute)); len(d3.DrainingListeners) != 3 {
		t.Errorf("after the drain time: %d draining, want the 3 just removed", len(d3.DrainingListeners))
	}
}

// A kind whose messages are all the ones recorded last time keeps the last
// records as they are (no new slice), and one message replaced by another
// pointer in a map of the same size is recorded again.
func TestRecorderKeepsUnchangedRecords(t *testing.T) {
	var r recorder
	t1, t2, t3 := time.Unix(100, 0), time.Unix(200, 0), time.Unix(300, 0)
	a, b := &listenerv3.Listener{Name: "a"}, &listenerv3.Listener{Name: "b"}
	res := func(v string, ls ...*listenerv3.Listener) *xdsclient.Resources {
		m := map[string]*listenerv3.Listener{}
		for _, x := range ls {
			m[x.GetName()] = x
		}
		return &xdsclient.Resources{Listeners: m, Versions: map[string]string{xdsclient.ListenerType: v}}
	}
	d1 := r.next(nil, res("1", a, b), time.Minute, t1)
	// A new map holding the same messages, as a state-of-the-world server's
	// re-sent response gives.
	d2 := r.next(nil, res("2", a, b), time.Minute, t2)
	if len(d2.Listeners) != 2 || &d2.Listeners[0] != &d1.Listeners[0] {
		t.Fatalf("unchanged listeners: records copied (%d), want the last dump's slice", len(d2.Listeners))
	}
	b2 := &listenerv3.Listener{Name: "b", StatPrefix: "changed"}
	d3 := r.next(nil, res("3", a, b2), time.Minute, t3)
	if &d3.Listeners[0] == &d2.Listeners[0] {
		t.Fatal("a changed listener: the last records reused")
	}
	if got := d3.Listeners[1]; got.Name != "b" || got.Msg != b2 || got.Version != "3" || !got.LastUpdated.Equal(t3) {
		t.Errorf("changed b: %q %v version %q at %v, want the new message, version 3 at %v", got.Name, got.Msg, got.Version, got.LastUpdated, t3)
	}
	if got := d3.Listeners[0]; got.Version != "1" || !got.LastUpdated.Equal(t1) {
		t.Errorf("unchanged a: version %q at %v, want 1 at %v", got.Version, got.LastUpdated, t1)
	}
	if len(d3.DrainingListeners) != 1 || d3.DrainingListeners[0].Name != "b" {
		t.Errorf("draining %v, want the old b", d3.DrainingListeners)
	}
}
