// Package imagebuild builds container images without Docker, from files on this machine:
// Shoal's own image (the static binary, CA certificates, a non-root user), and the small
// images the local cluster needs. Every image is reproducible: the same inputs give the same
// digest.
package imagebuild

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The non-root user the controller runs as (distroless's nonroot), and where the binary lives.
const (
	NonrootUID = 65532
	binaryPath = "usr/local/bin/shoal"
)

// epoch is every file's and every image's time: the digest depends on the inputs alone.
var epoch = time.Unix(0, 0)

// File is one regular file or symlink of a layer.
type File struct {
	Path     string // relative, slash-separated: usr/local/bin/shoal
	Mode     int64
	Data     []byte
	Linkname string // a symlink to this target when not empty
}

// Layer returns an uncompressed OCI layer holding files and the directories above them (0755;
// tmp/ is 1777 when listed as a directory File with Mode 0o1777 and a trailing slash).
func Layer(files []File) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]int64{}
	for _, f := range files {
		for d := path.Dir(strings.TrimSuffix(f.Path, "/")); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := dirs[d+"/"]; !ok {
				dirs[d+"/"] = 0o755
			}
		}
		if strings.HasSuffix(f.Path, "/") {
			dirs[f.Path] = f.Mode
		}
	}
	names := make([]string, 0, len(dirs))
	for d := range dirs {
		names = append(names, d)
	}
	sort.Strings(names)
	for _, d := range names {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: dirs[d], ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	for _, f := range files {
		var err error
		switch {
		case strings.HasSuffix(f.Path, "/"):
			continue
		case f.Linkname != "":
			err = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: f.Path, Linkname: f.Linkname, Mode: 0o777, ModTime: epoch})
		default:
			if err = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.Path, Mode: f.Mode, Size: int64(len(f.Data)), ModTime: epoch}); err == nil {
				_, err = tw.Write(f.Data)
			}
		}
		if err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// Image returns an OCI image of layers, for linux/arch, whose configuration config fills in.
func Image(arch string, layers []v1.Layer, config func(*v1.Config)) (v1.Image, error) {
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layers...)
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
	config(&cfg.Config)
	return mutate.ConfigFile(img, cfg)
}

// Shoal returns Shoal's image: one layer with the binary at /usr/local/bin/shoal, the CA
// bundle, /etc/passwd and /etc/group naming root and nonroot, and an empty /tmp, with the binary
// as the entrypoint; the same layout as the Dockerfile's distroless image.
func Shoal(binary, caFile, version, arch string) (v1.Image, error) {
	bin, err := os.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("binary: %w", err)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("CA certificates: %w", err)
	}
	layer, err := Layer([]File{
		{Path: "tmp/", Mode: 0o1777},
		{Path: binaryPath, Mode: 0o755, Data: bin},
		{Path: "etc/ssl/certs/ca-certificates.crt", Mode: 0o644, Data: ca},
		{Path: "etc/passwd", Mode: 0o644, Data: fmt.Appendf(nil, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonrootUID, NonrootUID)},
		{Path: "etc/group", Mode: 0o644, Data: fmt.Appendf(nil, "root:x:0:\nnonroot:x:%d:\n", NonrootUID)},
	})
	if err != nil {
		return nil, err
	}
	return Image(arch, []v1.Layer{layer}, func(c *v1.Config) {
		c.Entrypoint = []string{"/" + binaryPath}
		c.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"}
		c.Labels = map[string]string{
			"org.opencontainers.image.title":   "shoal",
			"org.opencontainers.image.version": version,
			"org.opencontainers.image.source":  "https://github.com/shoal-dev/shoal",
		}
	})
}
