//go:build !linux

package upstream

// tuneTCP: the port options of ports_linux.go are Linux's.
func tuneTCP(fd int, bound bool) {}
