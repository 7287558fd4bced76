//go:build !linux

package agent

import "os/exec"

// dieWithParent: only Linux has a parent-death signal; elsewhere (the
// laptop mode on darwin) the agent stops the proxy on its way out.
func dieWithParent(cmd *exec.Cmd) {}
