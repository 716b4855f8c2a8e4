package upstream_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/agent/upstream/upstreamtest"
)

// TestClientConformance runs the contract suite against the real Client and a real registry
// (Debian's docker-registry, distribution 2.8, which serves ranges with net/http's
// ServeContent). go-containerregistry's in-process registry (v0.22.1) is not used: it fails the
// suite, answering an open-ended range ("bytes=10-") and one ending past the blob with 416
// BLOB_UNKNOWN instead of the bytes there are, ignoring Accept, and serving a blob from any
// repository. A loopback front stands before the registry for what it cannot be made to do:
// serve a tampered manifest, and ignore Range.
func TestClientConformance(t *testing.T) {
	host := startRegistry(t)
	upstreamtest.Run(t, func(t *testing.T, f upstreamtest.Fixture) upstreamtest.Upstream {
		push(t, host, f)
		c := newClient(registryFront(t, host, f))
		t.Cleanup(c.CloseIdleConnections)
		return c
	})
}

// TestMemoryConformance runs the contract suite against the in-memory fake.
func TestMemoryConformance(t *testing.T) {
	upstreamtest.Run(t, func(_ *testing.T, f upstreamtest.Fixture) upstreamtest.Upstream {
		m := upstream.NewMemory()
		for _, b := range f.Blobs {
			m.AddBlob(f.Registry, f.Repository, b)
		}
		for _, man := range f.Manifests {
			m.AddManifest(f.Registry, f.Repository, man.Tag, man.Body, string(man.MediaType))
		}
		m.AddManifestAs(f.Registry, f.Repository, f.Tampered.Digest.String(), f.Tampered.Body, string(f.Tampered.MediaType))
		m.SetIgnoreRange(f.IgnoreRange)
		return m
	})
}

// rawManifest is a manifest to push as it is.
type rawManifest struct {
	body      []byte
	mediaType types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.body, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mediaType, nil }

// push uploads a fixture's blobs and manifests to the registry at host.
func push(t *testing.T, host string, f upstreamtest.Fixture) {
	t.Helper()
	repo, err := name.NewRepository(host+"/"+f.Repository, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	opts := []remote.Option{remote.WithContext(testContext(t)), remote.WithTransport(closingTransport(t))}
	for _, b := range f.Blobs {
		if err := remote.WriteLayer(repo, static.NewLayer(b, types.OCILayer), opts...); err != nil {
			t.Fatalf("push blob: %v", err)
		}
	}
	for _, m := range f.Manifests {
		if err := remote.Put(repo.Tag(m.Tag), rawManifest{m.Body, m.MediaType}, opts...); err != nil {
			t.Fatalf("push manifest %s: %v", m.Tag, err)
		}
	}
}

// registryFront stands before the registry at host and passes every request on, except that
// it serves f's tampered manifest, and drops the Range header when f asks for a registry that
// ignores ranges. It returns its own host:port.
func registryFront(t *testing.T, host string, f upstreamtest.Fixture) string {
	t.Helper()
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: host})
	proxy.Transport = closingTransport(t)
	// Distribution 2.8 answers a range past the end with 416, the blob's Content-Length and an
	// empty body. A client takes the status and drops the connection; a proxy copying that
	// body fails and aborts the response, so the front passes on what the body really holds.
	proxy.ModifyResponse = func(resp *http.Response) error {
		if resp.StatusCode < http.StatusBadRequest {
			return nil
		}
		body, _ := io.ReadAll(resp.Body) // short of Content-Length: the registry's own answer
		_ = resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		return nil
	}
	tampered := "/v2/" + f.Repository + "/manifests/" + f.Tampered.Digest.String()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == tampered && r.Method == http.MethodGet {
			w.Header().Set("Content-Type", string(f.Tampered.MediaType))
			w.Header().Set("Content-Length", strconv.Itoa(len(f.Tampered.Body)))
			_, _ = w.Write(f.Tampered.Body)
			return
		}
		if f.IgnoreRange {
			r.Header.Del("Range")
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// closingTransport is a transport of the test's own whose idle connections are closed when the
// test ends, so that no connection outlives it.
func closingTransport(t *testing.T) *http.Transport {
	tr, ok := http.DefaultTransport.(*http.Transport)
	if !ok {
		t.Fatalf("http.DefaultTransport is a %T", http.DefaultTransport)
	}
	tr = tr.Clone()
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}
