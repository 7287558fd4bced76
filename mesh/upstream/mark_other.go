//go:build !linux

package upstream

import "errors"

func setMark(fd int, mark uint32) error {
	return errors.New("SO_MARK is only supported on Linux")
}
