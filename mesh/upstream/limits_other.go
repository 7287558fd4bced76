//go:build !unix

package upstream

// withLimit returns err: only Unix has an open-file limit to name.
func withLimit(err error) error { return err }

func (d *Dialer) limited(err error) error { return err }

// ReserveFD: without an open-file limit there is nothing to hold.
func ReserveFD() (fd int, ok bool) { return -1, true }

// ReleaseFD gives back a descriptor ReserveFD held (none here).
func ReleaseFD(int) {}
