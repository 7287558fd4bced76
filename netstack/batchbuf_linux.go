package netstack

import "golang.org/x/sys/unix"

// allocRegion maps size bytes of private anonymous memory: demand-zero
// pages the Go collector neither scans nor counts. Falls back to the heap
// if the mapping fails (the buffers still work, only the GC accounting
// differs).
func allocRegion(size int) ([]byte, func()) {
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, size), func() {}
	}
	return b, func() { _ = unix.Munmap(b) }
}
