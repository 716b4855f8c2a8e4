package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// registryName is the name the pods' images carry; the controller is told where it is served
// (--registry-endpoint).
const registryName = "registry.test"

// registryServer is go-containerregistry's in-process registry on loopback, counting the
// requests it answers.
type registryServer struct {
	host      string // 127.0.0.1:PORT
	srv       *http.Server
	served    chan struct{}
	manifests atomic.Int64 // GET and HEAD of /v2/<repo>/manifests/<ref>
	blobs     atomic.Int64
}

func startRegistry() (*registryServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for the registry: %w", err)
	}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r := &registryServer{host: ln.Addr().String(), served: make(chan struct{})}
	r.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			switch {
			case strings.Contains(req.URL.Path, "/manifests/"):
				r.manifests.Add(1)
			case strings.Contains(req.URL.Path, "/blobs/"):
				r.blobs.Add(1)
			}
			inner.ServeHTTP(w, req)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() {
		defer close(r.served)
		_ = r.srv.Serve(ln) // ends with ErrServerClosed when closed
	}()
	return r, nil
}

func (r *registryServer) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := r.srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, r.srv.Close())
	}
	<-r.served
	return err
}

// image is one distinct image the pods use.
type image struct {
	Ref   string `json:"ref"` // under registryName
	Index bool   `json:"index"`
	// Seeded are the manifests the controller must write a SwarmSeed for, by digest: the
	// image's own, or an index's for the platforms of the nodes.
	Seeded map[string]string `json:"seeded"` // digest -> platform
	// Unseeded are an index's manifests for platforms no node has.
	Unseeded map[string]string `json:"unseeded,omitempty"`
}

// nodePlatforms are the platforms of the nodes (see nodePlatform); indexes also hold
// linux/s390x, which no node has, so that seeding only what the nodes run is seen to hold.
var (
	nodePlatforms  = []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64"}}
	otherPlatforms = []v1.Platform{{OS: "linux", Architecture: "s390x"}}
)

// pushImages pushes cfg.images distinct random images to the registry at host: every
// cfg.indexEvery-th an index, the others single manifests.
func pushImages(ctx context.Context, host string, cfg config) ([]image, error) {
	spec := harness.ImageSpec{Layers: cfg.layers, LayerSize: cfg.layerSize}
	out := make([]image, 0, cfg.images)
	for i := range cfg.images {
		repoTag := fmt.Sprintf("scale/img-%03d:v1", i)
		img := image{Ref: registryName + "/" + repoTag, Seeded: map[string]string{}}
		if cfg.indexEvery > 0 && i%cfg.indexEvery == 0 {
			img.Index, img.Unseeded = true, map[string]string{}
			idx, err := harness.PushIndex(ctx, host, repoTag, spec, append(append([]v1.Platform(nil), nodePlatforms...), otherPlatforms...)...)
			if err != nil {
				return nil, err
			}
			for _, p := range nodePlatforms {
				img.Seeded[idx.Images[p.String()].Digest.String()] = p.String()
			}
			for _, p := range otherPlatforms {
				img.Unseeded[idx.Images[p.String()].Digest.String()] = p.String()
			}
		} else {
			pushed, err := harness.PushImage(ctx, host, repoTag, spec)
			if err != nil {
				return nil, err
			}
			img.Seeded[pushed.Digest.String()] = pushed.Platform.String()
		}
		out = append(out, img)
	}
	return out, nil
}
