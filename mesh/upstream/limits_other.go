//go:build !unix

package upstream

// withLimit returns err: only Unix has an open-file limit to name.
func withLimit(err error) error { return err }

func (d *Dialer) limited(err error) error { return err }
