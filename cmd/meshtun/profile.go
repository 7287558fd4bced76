package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshtun/meshtun/controlplane"
)

const profileUsage = `usage:
  meshtun profile list                                   the built-in profiles
  meshtun profile dump [NAME]                            print a built-in profile (default: default), every field
  meshtun profile dump --controlplane ADDR               print the profile in force on a running control plane
  meshtun profile apply -f FILE [--controlplane ADDR]    validate FILE and put it in force (FILE "-" is stdin)

flags of dump and apply:`

// profileFlags are the flags of `meshtun profile dump|apply`.
type profileFlags struct {
	file         string
	controlPlane string
	tokenFile    string
	timeout      time.Duration
}

// runProfile is `meshtun profile` (istioctl profile dump / istioctl apply).
func runProfile(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stderr, profileUsage)
		newProfileFlagSet(&profileFlags{}, stderr).PrintDefaults()
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var f profileFlags
	fs := newProfileFlagSet(&f, stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, profileUsage)
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return 2
	}
	switch args[0] {
	case "list":
		if len(pos) > 0 {
			fmt.Fprintf(stderr, "meshtun profile list: unexpected argument %q\n", pos[0])
			return 2
		}
		fmt.Fprintln(stdout, "Profiles:")
		for _, n := range controlplane.ProfileNames() {
			fmt.Fprintf(stdout, "    %s\n", n)
		}
		return 0
	case "dump":
		return profileDump(&f, pos, stdout, stderr)
	case "apply":
		return profileApply(&f, pos, stdout, stderr)
	}
	fmt.Fprintf(stderr, "meshtun profile: unknown subcommand %q (want list, dump or apply)\n", args[0])
	return 2
}

func newProfileFlagSet(f *profileFlags, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("meshtun profile", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.file, "f", "", "apply: the profile file (YAML, kind MeshConfig or IstioOperator); - for stdin")
	fs.StringVar(&f.file, "filename", "", "same as -f")
	fs.StringVar(&f.controlPlane, "controlplane", "", "host:port of a running control plane's API (its --api-address; apply defaults to 127.0.0.1:15014)")
	fs.StringVar(&f.tokenFile, "token-file", filepath.Join("/run/meshtun", controlplane.TokenFileName), "the control plane's API token (written in its --state-dir)")
	fs.DurationVar(&f.timeout, "timeout", 10*time.Second, "API request timeout")
	return fs
}

// parseInterleaved parses flags anywhere among the arguments and returns
// the positional ones: `dump demo --controlplane x` works as well as
// `dump --controlplane x demo`.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func profileDump(f *profileFlags, pos []string, stdout, stderr io.Writer) int {
	if len(pos) > 1 {
		fmt.Fprintf(stderr, "meshtun profile dump: unexpected argument %q\n", pos[1])
		return 2
	}
	if f.file != "" {
		fmt.Fprintln(stderr, "meshtun profile dump: -f is a flag of apply")
		return 2
	}
	if f.controlPlane != "" {
		if len(pos) > 0 {
			fmt.Fprintln(stderr, "meshtun profile dump: give a profile NAME or --controlplane, not both")
			return 2
		}
		body, _, code := profileRequest(f, http.MethodGet, "", nil, stderr)
		if code != 0 {
			return code
		}
		stdout.Write(body)
		return 0
	}
	name := controlplane.DefaultProfileName
	if len(pos) == 1 {
		name = pos[0]
	}
	p, err := controlplane.BuiltinProfile(name)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun profile dump: %v\n", err)
		return 1
	}
	b, err := controlplane.MarshalProfile(p)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun profile dump: %v\n", err)
		return 1
	}
	stdout.Write(b)
	return 0
}

func profileApply(f *profileFlags, pos []string, stdout, stderr io.Writer) int {
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "meshtun profile apply: unexpected argument %q (the file goes after -f)\n", pos[0])
		return 2
	}
	if f.file == "" {
		fmt.Fprintln(stderr, "meshtun profile apply: -f FILE is required")
		return 2
	}
	var data []byte
	var err error
	if f.file == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(f.file)
	}
	if err != nil {
		fmt.Fprintf(stderr, "meshtun profile apply: %v\n", err)
		return 1
	}
	// Validate here first: a bad file never reaches the control plane.
	p, err := controlplane.ParseProfile(f.file, data)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun profile apply: %v\nnothing was changed\n", err)
		return 1
	}
	if f.controlPlane == "" {
		f.controlPlane = "127.0.0.1:15014"
	}
	_, version, code := profileRequest(f, http.MethodPost, f.file, data, stderr)
	if code != 0 {
		return code
	}
	fmt.Fprintf(stdout, "profile %q applied (outboundTrafficPolicy.mode %s): configuration version %s pushed\n",
		p.Metadata.Name, p.Spec.OutboundTrafficPolicy.Mode, version)
	return 0
}

// profileRequest calls the control plane's /v1/profile; code is the exit
// code (0 on success).
func profileRequest(f *profileFlags, method, source string, body []byte, stderr io.Writer) (resp []byte, version string, code int) {
	name := "meshtun profile " + map[string]string{http.MethodGet: "dump", http.MethodPost: "apply"}[method]
	token, err := controlplane.ReadTokenFile(f.tokenFile)
	if err != nil {
		fmt.Fprintf(stderr, "%s: --token-file: %v\n", name, err)
		return nil, "", 1
	}
	u := url.URL{Scheme: "http", Host: f.controlPlane, Path: "/v1/profile"}
	if source != "" {
		u.RawQuery = url.Values{"source": {source}}.Encode()
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(body))
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return nil, "", 2
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != nil {
		req.Header.Set("Content-Type", "application/yaml")
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "%s: control plane %s: %v\n", name, f.controlPlane, err)
		return nil, "", 1
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	if err != nil {
		fmt.Fprintf(stderr, "%s: control plane %s: %v\n", name, f.controlPlane, err)
		return nil, "", 1
	}
	if r.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(b))
		switch r.StatusCode {
		case http.StatusBadRequest:
			fmt.Fprintf(stderr, "%s: rejected by the control plane: %s\nnothing was changed\n", name, msg)
		default:
			fmt.Fprintf(stderr, "%s: control plane %s: %s: %s\n", name, f.controlPlane, r.Status, msg)
		}
		return nil, "", 1
	}
	return b, r.Header.Get(controlplane.VersionHeader), 0
}
