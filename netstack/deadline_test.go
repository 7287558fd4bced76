package netstack

import (
	"testing"
	"time"
)

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// TestDeadlineReusedTimer: one timer serves every deadline of a direction;
// a deadline moved later, cleared, or replaced never closes the channel of
// the one after it, a passed deadline does, and setting and clearing a
// deadline (what a keep-alive HTTP/1.1 connection does per request)
// allocates nothing once the timer exists.
func TestDeadlineReusedTimer(t *testing.T) {
	var d deadline
	d.init()

	d.set(time.Now().Add(20 * time.Millisecond))
	select {
	case <-d.wait():
	case <-time.After(5 * time.Second):
		t.Fatal("a deadline 20 ms ahead did not pass in 5 s")
	}
	timer := d.timer

	// Passed deadline replaced: a fresh, open channel.
	d.set(time.Now().Add(time.Hour))
	if closed(d.wait()) {
		t.Fatal("the channel is closed right after a deadline an hour ahead was set")
	}
	if d.timer != timer {
		t.Fatal("set made a new timer instead of re-arming the first one")
	}

	// A sooner deadline replaced by a later one: the sooner one's
	// instant passes with the channel still open.
	d.set(time.Now().Add(10 * time.Millisecond))
	d.set(time.Now().Add(time.Hour))
	time.Sleep(50 * time.Millisecond)
	if closed(d.wait()) {
		t.Fatal("a deadline moved an hour ahead fired at the earlier instant")
	}

	// Cleared: nothing fires.
	d.set(time.Now().Add(10 * time.Millisecond))
	d.set(time.Time{})
	time.Sleep(50 * time.Millisecond)
	if closed(d.wait()) {
		t.Fatal("a cleared deadline fired")
	}

	// A deadline in the past closes at once; the next set reopens.
	d.set(time.Now().Add(-time.Second))
	if !closed(d.wait()) {
		t.Fatal("a deadline in the past left the channel open")
	}
	d.set(time.Time{})
	if closed(d.wait()) {
		t.Fatal("clearing a passed deadline left the channel closed")
	}

	// A stale callback (due for an earlier arming) closes nothing while
	// the armed deadline is ahead.
	d.set(time.Now().Add(time.Hour))
	d.fire()
	if closed(d.wait()) {
		t.Fatal("a callback ran before the armed deadline closed the channel")
	}

	if n := testing.AllocsPerRun(100, func() {
		d.set(time.Now().Add(time.Minute))
		d.set(time.Time{})
	}); n != 0 {
		t.Fatalf("setting and clearing a deadline allocates %.1f times; want 0 (the timer is re-armed)", n)
	}
	d.stop()
}
