package netstack

// batchBufs returns n buffers of size bytes each, carved from one
// allocation made outside the Go heap where the platform allows it
// (batchbuf_linux.go), and a function that releases them.
//
// Why off the heap: the TUN's read and write vectors are batch × (MTU +
// offset) bytes each (2 × 128 × 64 KiB = 16 MiB) of which only the bytes
// actually written are ever touched. On the Go heap they count as live in
// full, so the collector's goal (twice the live heap at the default GOGC)
// let 16 MiB more garbage pile up between collections: under an
// allocating load such as HTTP through the connection manager the
// process's RSS grew by that much garbage, which the untouched buffers
// themselves never cost. Outside the heap they still cost only the pages
// the kernel fills.
func batchBufs(n, size int) (bufs [][]byte, release func()) {
	region, release := allocRegion(n * size)
	bufs = make([][]byte, n)
	for i := range bufs {
		bufs[i] = region[i*size : (i+1)*size : (i+1)*size]
	}
	return bufs, release
}
