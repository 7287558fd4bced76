package agent

import (
	"os/exec"
	"syscall"
)

// dieWithParent has the kernel kill the child when the agent's thread
// that started it exits (PR_SET_PDEATHSIG).
func dieWithParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}
