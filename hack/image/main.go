// Command image builds Shoal's container image without Docker: the static shoal binary, the
// CA certificates of the build machine (for HTTPS registries), and the files a non-root user
// needs, in one layer on an empty base, the same layout as the Dockerfile's distroless image.
// It writes the image as an OCI layout directory, or pushes it.
//
//	go run ./hack/image -binary bin/shoal -version v0.1.0 -layout out/image
//	go run ./hack/image -binary bin/shoal -version v0.1.0 -push 127.0.0.1:5000/shoal:v0.1.0
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-dev/shoal/internal/imagebuild"
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
	img, err := imagebuild.Shoal(*binary, *caFile, *version, *arch)
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
