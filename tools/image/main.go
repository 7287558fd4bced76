// Command image builds meshtun's container image with no daemon and no
// registry: from static meshtun binaries (one per architecture) it writes
// a docker-save tarball per architecture (`docker load` / `ctr import` /
// `kind load image-archive` take it) and one OCI image layout holding the
// multi-architecture index.
//
// The image is only what the sidecar needs: /usr/local/bin/meshtun, the
// name pilot-agent for it (Istio's injection template and lifecycle hooks
// call pilot-agent; meshtun dispatches on argv[0]), user 1337:1337 as
// Istio's istio-proxy runs. No shell, no libc, no package manager.
//
// It is reproducible: every timestamp is SOURCE_DATE_EPOCH (default 0),
// file owners and modes are fixed, and layers are written in a fixed
// order, so the same binaries give the same digests.
//
// It lives in its own module so that the proxy binary's dependencies stay
// as they are: go-containerregistry is a build tool here, never linked in.
//
//	go run . -version v1 -out ../../dist linux/amd64=PATH linux/arm64=PATH
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// User is the image's user: Istio's sidecar uid and gid.
const User = "1337:1337"

func main() {
	version := flag.String("version", "dev", "image tag and org.opencontainers.image.version")
	out := flag.String("out", "dist", "output folder")
	repo := flag.String("repo", "meshtun", "repository name of the tag in the docker-save tarballs")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: image [-version V] [-out DIR] [-repo NAME] OS/ARCH=BINARY...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	epoch, err := sourceDateEpoch()
	if err != nil {
		fatal(err)
	}
	var builds []Build
	for _, a := range flag.Args() {
		plat, bin, ok := strings.Cut(a, "=")
		os_, arch, ok2 := strings.Cut(plat, "/")
		if !ok || !ok2 || bin == "" {
			fatal(fmt.Errorf("argument %q: want OS/ARCH=BINARY, e.g. linux/amd64=dist/linux-amd64/meshtun", a))
		}
		builds = append(builds, Build{OS: os_, Arch: arch, Binary: bin})
	}
	res, err := Write(*out, *repo, *version, epoch, builds)
	if err != nil {
		fatal(err)
	}
	for _, r := range res {
		fmt.Printf("%s/%s %s %s\n", r.OS, r.Arch, r.Digest, r.Tarball)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "image:", err)
	os.Exit(1)
}

// sourceDateEpoch is SOURCE_DATE_EPOCH (reproducible-builds.org), default 0.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q: want seconds since 1970", s)
	}
	return time.Unix(n, 0).UTC(), nil
}

// Build is one architecture's input.
type Build struct {
	OS, Arch, Binary string
}

// Result is one architecture's image.
type Result struct {
	OS, Arch string
	Digest   v1.Hash
	Tarball  string
	Image    v1.Image
}

// Image builds the image of one static binary.
func Image(bin []byte, os_, arch, version string, epoch time.Time) (v1.Image, error) {
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		b, err := rootfs(bin, epoch)
		return io.NopCloser(bytes.NewReader(b)), err
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), plainLayer{layer})
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = os_, arch
	cf.Created = v1.Time{Time: epoch}
	cf.Author = "meshtun"
	cf.Config = v1.Config{
		User:       User,
		Entrypoint: []string{"/usr/local/bin/meshtun"},
		Env:        []string{"PATH=/usr/local/bin"},
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":   "meshtun",
			"org.opencontainers.image.version": version,
			"org.opencontainers.image.description": "service-mesh sidecar proxy: TUN capture, userspace TCP/IP, Envoy's xDS; " +
				"answers to pilot-agent",
		},
	}
	// The history entry's time is the epoch too (mutate would stamp now).
	cf.History = []v1.History{{Created: v1.Time{Time: epoch}, CreatedBy: "meshtun tools/image", Comment: "meshtun " + version}}
	return mutate.ConfigFile(img, cf)
}

// rootfs is the image's only layer: the binary and its pilot-agent name,
// with fixed owners, modes and times.
func rootfs(bin []byte, epoch time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := func(h *tar.Header) error {
		h.ModTime, h.AccessTime, h.ChangeTime = epoch, time.Time{}, time.Time{}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
		h.Format = tar.FormatPAX
		return tw.WriteHeader(h)
	}
	for _, d := range []string{"usr/", "usr/local/", "usr/local/bin/", "tmp/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777 // a writable scratch folder, as distroless has
		}
		if err := hdr(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode}); err != nil {
			return nil, err
		}
	}
	if err := hdr(&tar.Header{Typeflag: tar.TypeReg, Name: "usr/local/bin/meshtun", Mode: 0o755, Size: int64(len(bin))}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	if err := hdr(&tar.Header{Typeflag: tar.TypeSymlink, Name: "usr/local/bin/pilot-agent", Linkname: "meshtun", Mode: 0o777}); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Write builds every architecture's image, writes its docker-save tarball
// (<out>/meshtun-<version>-<os>-<arch>.tar) and an OCI layout
// (<out>/oci) whose index lists them all with their platforms.
func Write(out, repo, version string, epoch time.Time, builds []Build) ([]Result, error) {
	sort.Slice(builds, func(i, j int) bool { return builds[i].OS+builds[i].Arch < builds[j].OS+builds[j].Arch })
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	tag, err := name.NewTag(repo + ":" + version)
	if err != nil {
		return nil, fmt.Errorf("tag %s:%s: %w", repo, version, err)
	}
	ociDir := filepath.Join(out, "oci")
	if err := os.RemoveAll(ociDir); err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	var res []Result
	for _, b := range builds {
		bin, err := os.ReadFile(b.Binary)
		if err != nil {
			return nil, err
		}
		img, err := Image(bin, b.OS, b.Arch, version, epoch)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", b.OS, b.Arch, err)
		}
		d, err := img.Digest()
		if err != nil {
			return nil, err
		}
		tb := filepath.Join(out, fmt.Sprintf("meshtun-%s-%s-%s.tar", version, b.OS, b.Arch))
		if err := tarball.WriteToFile(tb, tag, img); err != nil {
			return nil, fmt.Errorf("%s: %w", tb, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform:    &v1.Platform{OS: b.OS, Architecture: b.Arch},
			Annotations: map[string]string{"org.opencontainers.image.ref.name": version},
		}})
		res = append(res, Result{OS: b.OS, Arch: b.Arch, Digest: d, Tarball: tb, Image: img})
	}
	if _, err := layout.Write(ociDir, idx); err != nil {
		return nil, fmt.Errorf("%s: %w", ociDir, err)
	}
	return res, nil
}

// plainLayer describes a layer with no annotations at all: the tarball
// layer's descriptor carries an empty (non-nil) annotation map, which the
// manifest would then disagree about with its own JSON (validate.Image
// rejects that).
type plainLayer struct{ v1.Layer }

func (l plainLayer) Descriptor() (*v1.Descriptor, error) {
	d, err := l.Digest()
	if err != nil {
		return nil, err
	}
	n, err := l.Size()
	if err != nil {
		return nil, err
	}
	mt, err := l.MediaType()
	if err != nil {
		return nil, err
	}
	return &v1.Descriptor{MediaType: mt, Size: n, Digest: d}, nil
}
