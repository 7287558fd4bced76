//go:build !linux

package main

import "errors"

// redirect is the iptables REDIRECT reference: Linux only.
func redirect([]string) error {
	return errors.New("redirect: the iptables REDIRECT reference proxy is Linux only")
}
