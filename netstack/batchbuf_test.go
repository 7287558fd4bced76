package netstack

import (
	"runtime"
	"testing"
)

// TestBatchBufsOffHeap: the TUN batch buffers are disjoint, full-size and
// writable, and on Linux they do not count in the Go heap, whose size sets
// the collector's goal (an untouched 16 MiB there let 16 MiB more garbage
// pile up under an HTTP load).
func TestBatchBufsOffHeap(t *testing.T) {
	const n, size = 128, tunOffset + 65535
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	bufs, release := batchBufs(n, size)
	defer release()
	runtime.ReadMemStats(&m1)
	if len(bufs) != n {
		t.Fatalf("got %d buffers, want %d", len(bufs), n)
	}
	for i, b := range bufs {
		if len(b) != size || cap(b) != size {
			t.Fatalf("buffer %d: len %d cap %d, want %d (a larger cap would let an append run into the next buffer)", i, len(b), cap(b), size)
		}
		b[0], b[size-1] = byte(i), byte(i)
	}
	for i, b := range bufs {
		if b[0] != byte(i) || b[size-1] != byte(i) {
			t.Fatalf("buffer %d overlaps another", i)
		}
	}
	if runtime.GOOS == "linux" {
		if grew := int64(m1.HeapAlloc) - int64(m0.HeapAlloc); grew > n*size/16 {
			t.Fatalf("the heap grew by %d bytes for %d bytes of buffers: they are on the Go heap", grew, n*size)
		}
	}
}
