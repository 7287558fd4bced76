package tun

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// tunNode is the TUN clone device every TUN is created through.
const tunNode = "/dev/net/tun"

// ensureNode creates /dev/net/tun (character device 10:200, mode 0666 as
// udev makes it) when it is missing, as it is in a container: runtimes let
// the device through the device cgroup but do not create the node
// (tailscale#10814, #11733). Creating it needs CAP_MKNOD; without it the
// error says what is missing and what to grant.
func ensureNode(path string) error {
	if _, err := os.Stat(path); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return nil // present (or not ours to judge: CreateTUN reports it)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("tun: %s is missing and its folder cannot be made: %w", path, err)
	}
	if err := unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(10, 200))); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("tun: %s is missing (containers do not get the node) and creating it failed: %w; grant CAP_MKNOD, or mount the host's /dev/net/tun", path, err)
	}
	// mknod applies the umask: set the mode the device has on a host.
	return os.Chmod(path, 0o666)
}
