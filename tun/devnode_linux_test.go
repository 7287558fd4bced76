package tun

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestEnsureNodeCreatesTheTUNClone: a container's missing /dev/net/tun is
// made as the character device 10:200 (checked on a path of the test's
// own: the host's node is left alone).
func TestEnsureNodeCreatesTheTUNClone(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(t.TempDir(), "dev", "net", "tun")
	if err := ensureNode(path); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(uint64(st.Rdev)) != 10 || unix.Minor(uint64(st.Rdev)) != 200 || st.Mode&0o777 != 0o666 {
		t.Fatalf("node: mode %o rdev %d:%d, want a 0666 character device 10:200", st.Mode, unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)))
	}
	// Present: left as it is.
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ensureNode(path); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("an existing node was changed: %v", fi.Mode())
	}
}
