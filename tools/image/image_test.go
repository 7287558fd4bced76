package main

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

var (
	buildOnce sync.Once
	built     string
	buildErr  error
)

// staticMeshtun is the real binary for this machine's architecture, built
// once per test run as `make image` builds it (static, -trimpath, no VCS
// stamp, empty build id). `make image` builds arm64 too; the tests need
// one architecture to check the tool.
func staticMeshtun(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "meshtun-image-test-")
		if err != nil {
			buildErr = err
			return
		}
		built, buildErr = goBuild(filepath.Join(dir, "meshtun"), runtime.GOARCH)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func goBuild(out, arch string) (string, error) {
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w -buildid= -X main.version=test",
		"-o", out, "./cmd/meshtun")
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, b)
	}
	return out, nil
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built != "" {
		os.RemoveAll(filepath.Dir(built))
	}
	os.Exit(code)
}

// TestReproducibleAndValid: the same binary gives the same digest; the
// image and the docker-save tarball read back pass go-containerregistry's
// validation; the OCI index lists the platform.
func TestReproducibleAndValid(t *testing.T) {
	builds := []Build{{"linux", runtime.GOARCH, staticMeshtun(t)}}
	epoch := time.Unix(1700000000, 0).UTC()
	a, err := Write(t.TempDir(), "meshtun", "test", epoch, builds)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	b, err := Write(out, "meshtun", "test", epoch, builds)
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 1 || len(b) != 1 {
		t.Fatalf("results %d and %d, want 1", len(a), len(b))
	}
	for i := range a {
		if a[i].Digest != b[i].Digest {
			t.Fatalf("%s/%s: digests %s and %s: the build is not reproducible", a[i].OS, a[i].Arch, a[i].Digest, b[i].Digest)
		}
		if err := validate.Image(b[i].Image); err != nil {
			t.Fatalf("%s/%s: %v", b[i].OS, b[i].Arch, err)
		}
		img, err := tarball.ImageFromPath(b[i].Tarball, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := validate.Image(img); err != nil {
			t.Fatalf("%s read back: %v", b[i].Tarball, err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.Config.User != "1337:1337" || cf.Architecture != b[i].Arch || !cf.Created.Time.Equal(epoch) ||
			len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/usr/local/bin/meshtun" {
			t.Fatalf("%s config: user %q arch %q created %v entrypoint %q", b[i].Tarball, cf.Config.User, cf.Architecture, cf.Created, cf.Config.Entrypoint)
		}
	}
	idx, err := layout.ImageIndexFromPath(filepath.Join(out, "oci"))
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(idx); err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var plats []string
	for _, m := range im.Manifests {
		if m.Platform == nil {
			t.Fatalf("OCI index entry %s has no platform", m.Digest)
		}
		if m.Digest != b[0].Digest {
			t.Fatalf("OCI index entry %s is not the image %s", m.Digest, b[0].Digest)
		}
		plats = append(plats, m.Platform.OS+"/"+m.Platform.Architecture)
	}
	if strings.Join(plats, ",") != "linux/"+runtime.GOARCH {
		t.Fatalf("OCI index platforms %v", plats)
	}
}

// TestRootfsRunsAsIstioUser extracts the image's filesystem and runs the
// binary in it as uid 1337 (chroot --userspec), by both names: it is
// static, it needs nothing else from the image, and pilot-agent dispatches.
func TestRootfsRunsAsIstioUser(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (chroot)")
		}
		t.Skip("needs root (chroot)")
	}
	bin := staticMeshtun(t)
	res, err := Write(t.TempDir(), "meshtun", "test", time.Unix(0, 0), []Build{{"linux", runtime.GOARCH, bin}})
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	rc := mutate.Extract(res[0].Image)
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		p := filepath.Join(root, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, os.FileMode(h.Mode)&os.ModePerm); err != nil {
				t.Fatal(err)
			}
			_ = os.Chmod(p, os.FileMode(h.Mode)&os.ModePerm)
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, os.FileMode(h.Mode))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := strings.Join(names, " "); got != "usr usr/local usr/local/bin tmp usr/local/bin/meshtun usr/local/bin/pilot-agent" {
		t.Fatalf("image contents: %s", got)
	}
	for _, tc := range []struct{ name, want string }{{"meshtun", "meshtun test"}, {"pilot-agent", "(as pilot-agent)"}} {
		out, err := exec.Command("chroot", "--userspec=1337:1337", root, "/usr/local/bin/"+tc.name, "version").CombinedOutput()
		if err != nil || !strings.Contains(string(out), tc.want) {
			t.Fatalf("chroot --userspec=1337:1337 %s version: %v %q", tc.name, err, out)
		}
	}
}
