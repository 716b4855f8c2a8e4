// Command image builds Shoal's container image without Docker: the static shoal binary, the
// CA certificates of the build machine (for HTTPS registries), and the files a non-root user
// needs, in one layer on an empty base, the same layout as the Dockerfile's distroless image.
// It writes the image as an OCI layout directory, or pushes it.
//
//	go run ./hack/image -binary bin/shoal -version v0.1.0 -layout out/image
//	go run ./hack/image -binary bin/shoal -version v0.1.0 -push 127.0.0.1:5000/shoal:v0.1.0
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The non-root user the controller runs as (distroless's nonroot).
const (
	nonrootUID = 65532
	binaryPath = "usr/local/bin/shoal"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	binary := fs.String("binary", "bin/shoal", "the static shoal binary (make build)")
	version := fs.String("version", "dev", "the image's version label")
	caFile := fs.String("ca-certificates", "/etc/ssl/certs/ca-certificates.crt", "PEM bundle of CA certificates to include")
	arch := fs.String("arch", runtime.GOARCH, "the binary's architecture")
	layoutDir := fs.String("layout", "", "write the image to this OCI layout directory")
	push := fs.String("push", "", "push the image to this reference (plain HTTP for loopback registries)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*layoutDir == "") == (*push == "") {
		return errors.New("give one of -layout and -push")
	}
	img, err := Build(*binary, *caFile, *version, *arch)
	if err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	if *layoutDir != "" {
		p, err := layout.Write(*layoutDir, empty.Index)
		if err != nil {
			return err
		}
		if err := p.AppendImage(img); err != nil {
			return err
		}
		fmt.Printf("wrote %s to %s\n", d, *layoutDir)
		return nil
	}
	ref, err := name.ParseReference(*push, name.Insecure)
	if err != nil {
		return err
	}
	if err := remote.Write(ref, img); err != nil {
		return err
	}
	fmt.Printf("pushed %s@%s\n", ref, d)
	return nil
}

// Build returns the image: one layer with the binary at /usr/local/bin/shoal, the CA bundle,
// /etc/passwd and /etc/group naming root and nonroot, and an empty /tmp, with the binary as the
// entrypoint.
func Build(binary, caFile, version, arch string) (v1.Image, error) {
	bin, err := os.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("binary: %w", err)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("CA certificates: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	dirs := []string{"etc/", "etc/ssl/", "etc/ssl/certs/", "usr/", "usr/local/", "usr/local/bin/"}
	for _, d := range dirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777, ModTime: epoch}); err != nil {
		return nil, err
	}
	files := []struct {
		name string
		mode int64
		data []byte
	}{
		{binaryPath, 0o755, bin},
		{"etc/ssl/certs/ca-certificates.crt", 0o644, ca},
		{"etc/passwd", 0o644, fmt.Appendf(nil, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", nonrootUID, nonrootUID)},
		{"etc/group", 0o644, fmt.Appendf(nil, "root:x:0:\nnonroot:x:%d:\n", nonrootUID)},
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: f.mode, Size: int64(len(f.data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layer)
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", arch
	cfg.Created = v1.Time{Time: epoch}
	cfg.Config.Entrypoint = []string{"/" + binaryPath}
	cfg.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"}
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   "shoal",
		"org.opencontainers.image.version": version,
		"org.opencontainers.image.source":  "https://github.com/shoal-dev/shoal",
	}
	return mutate.ConfigFile(img, cfg)
}
