//go:build !linux && !darwin

package upstream

import "errors"

func setMark(fd int, mark uint32) error {
	if mark == 0 {
		return nil
	}
	return errors.New("SO_MARK is only supported on Linux")
}

func bindInterface(fd int, network string, index int) error {
	return errors.New("binding sockets to an interface is supported on Linux and darwin only")
}
