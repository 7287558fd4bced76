//go:build !linux

package netstack

// allocRegion allocates on the Go heap where anonymous mappings are not
// used.
func allocRegion(size int) ([]byte, func()) { return make([]byte, size), func() {} }
