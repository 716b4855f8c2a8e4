package main

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/shoal-dev/shoal/internal/imagebuild"
)

// TestLayout writes the image as make image does, an OCI layout, and checks that the layout
// holds exactly the image imagebuild.Shoal builds from the same inputs.
func TestLayout(t *testing.T) {
	dir := t.TempDir()
	// Any file stands in for the binary: this test compares images, it runs nothing (the
	// image's own test, in internal/imagebuild, runs what it packs).
	bin := filepath.Join(dir, "shoal")
	if err := os.WriteFile(bin, []byte("#!stand-in for shoal\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	want, err := imagebuild.Shoal(bin, ca, "v-layout", runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	wantDigest, err := want.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"-binary", bin, "-ca-certificates", ca, "-version", "v-layout", "-layout", filepath.Join(dir, "layout")}); err != nil {
		t.Fatal(err)
	}
	p, err := layout.FromPath(filepath.Join(dir, "layout"))
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil || len(m.Manifests) != 1 || m.Manifests[0].Digest != wantDigest {
		t.Errorf("layout index %+v, %v; want the image %s", m, err, wantDigest)
	}
}
