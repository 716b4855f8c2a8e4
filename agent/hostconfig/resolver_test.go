package hostconfig

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
)

// registryStub answers manifest requests for one image, or fails them, and records requests.
type registryStub struct {
	fail bool
	mu   sync.Mutex
	reqs []string // "path ns=<ns>"
}

func (s *registryStub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.reqs = append(s.reqs, r.URL.Path+" ns="+r.URL.Query().Get("ns"))
	s.mu.Unlock()
	if s.fail {
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
		return
	}
	if !strings.HasSuffix(r.URL.Path, "/manifests/v1") {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	w.Header().Set("Docker-Content-Digest", "sha256:"+strings.Repeat("a", 64))
	w.Header().Set("Content-Length", "2")
	if r.Method == http.MethodGet {
		_, _ = w.Write([]byte("{}"))
	}
}

func (s *registryStub) requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.reqs...)
}

// closedPort returns a loopback address nothing listens on: a dead agent.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// TestContainerdResolverUsesMirrorThenFallsBack drives containerd 1.6.20's own resolver with
// the files Write produces: the mirror is asked first with ?ns=<registry>, and when it fails
// or is down the pull still resolves from the upstream.
func TestContainerdResolverUsesMirrorThenFallsBack(t *testing.T) {
	upstream := &registryStub{}
	upstreamSrv := httptest.NewServer(upstream)
	defer upstreamSrv.Close()
	upstreamHost := strings.TrimPrefix(upstreamSrv.URL, "http://")

	tests := []struct {
		name         string
		mirror       string // "ok", "fail" or "down"
		registry     string // what Shoal mirrors
		ref          string
		wantNS       string // ns the mirror must see ("" when it is down)
		wantUpstream bool
	}{
		{"healthy mirror serves", "ok", "registry.test", "registry.test/app:v1", "registry.test", false},
		{"failing mirror falls back", "fail", "registry.test", "registry.test/app:v1", "registry.test", true},
		{"dead mirror falls back", "down", "registry.test", "registry.test/app:v1", "", true},
		{"catch-all: failing mirror falls back to the registry itself", "fail", "*", upstreamHost + "/app:v1", upstreamHost, true},
		{"catch-all: dead mirror", "down", "*", upstreamHost + "/app:v1", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			upstream.mu.Lock()
			upstream.reqs = nil
			upstream.mu.Unlock()
			mirror := &registryStub{fail: tt.mirror == "fail"}
			mirrorURL := "http://" + closedPort(t)
			if tt.mirror != "down" {
				srv := httptest.NewServer(mirror)
				defer srv.Close()
				mirrorURL = srv.URL
			}
			dir := t.TempDir()
			err := Write(Config{Dir: dir, MirrorURL: mirrorURL, Registries: []string{tt.registry},
				Upstream: func(string) string { return upstreamSrv.URL }})
			if err != nil {
				t.Fatal(err)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			resolver := docker.NewResolver(docker.ResolverOptions{
				Hosts: config.ConfigureHosts(ctx, config.HostOptions{HostDir: config.HostDirFromRoot(dir)}),
			})
			_, desc, err := resolver.Resolve(ctx, tt.ref)
			if err != nil {
				t.Fatalf("containerd could not resolve %s: %v", tt.ref, err)
			}
			if desc.Digest.Encoded() != strings.Repeat("a", 64) {
				t.Errorf("resolved %s", desc.Digest)
			}

			mirrorReqs := mirror.requests()
			if tt.wantNS != "" {
				if len(mirrorReqs) == 0 || !strings.HasSuffix(mirrorReqs[0], " ns="+tt.wantNS) {
					t.Errorf("mirror requests %q, want the first with ns=%s", mirrorReqs, tt.wantNS)
				}
			}
			if got := len(upstream.requests()) > 0; got != tt.wantUpstream {
				t.Errorf("upstream contacted: %v, want %v (upstream %q, mirror %q)", got, tt.wantUpstream, upstream.requests(), mirrorReqs)
			}
		})
	}
}
