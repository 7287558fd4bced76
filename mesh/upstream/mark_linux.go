package upstream

import "golang.org/x/sys/unix"

func setMark(fd int, mark uint32) error {
	if mark == 0 {
		return nil
	}
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark))
}

// bindInterface is not needed on Linux: the mark keeps sockets off the
// capture routes.
func bindInterface(fd int, network string, index int) error { return nil }
