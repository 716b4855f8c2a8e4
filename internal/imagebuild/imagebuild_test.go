package imagebuild

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestShoalImage builds the image from a static binary (a small stand-in for shoal: building shoal
// itself with -trimpath costs minutes): its one layer holds the binary, the CA bundle and the
// non-root user; the binary runs; the entrypoint and labels are set; and the same inputs give
// the same digest.
func TestShoalImage(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "shoal")
	build := exec.CommandContext(t.Context(), "go", "build", "-trimpath", "-ldflags", "-X main.version=v-image-test", "-o", bin, "./testdata/version")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Shoal(bin, ca, "v-image-test", runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Shoal(bin, ca, "v-image-test", runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("two builds of the same inputs: %s and %s", d1, d2)
	}

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.Config.Entrypoint, " "); got != "/usr/local/bin/shoal" || cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("entrypoint %q, platform %s/%s", got, cfg.OS, cfg.Architecture)
	}
	if cfg.Config.Labels["org.opencontainers.image.version"] != "v-image-test" {
		t.Errorf("labels %v", cfg.Config.Labels)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	extracted := filepath.Join(dir, "extracted-shoal")
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h
		if h.Name == "usr/local/bin/shoal" {
			f, err := os.OpenFile(extracted, os.O_CREATE|os.O_WRONLY, 0o755)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	}
	for name, mode := range map[string]int64{"usr/local/bin/shoal": 0o755, "etc/ssl/certs/ca-certificates.crt": 0o644, "etc/passwd": 0o644, "tmp/": 0o1777} {
		if h := files[name]; h == nil || h.Mode != mode {
			t.Errorf("%s: %+v, want mode %o", name, h, mode)
		}
	}
	out, err := exec.CommandContext(t.Context(), extracted, "version").Output()
	if err != nil || strings.TrimSpace(string(out)) != "v-image-test" {
		t.Errorf("the image's binary says %q, %v; want v-image-test", out, err)
	}

}
