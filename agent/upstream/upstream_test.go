package upstream_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// newClient returns a client that finds the logical registry "registry.test" at http://host.
func newClient(host string, opts ...upstream.Option) *upstream.Client {
	resolve := func(registry string) (upstream.Endpoint, error) {
		if registry != "registry.test" {
			return upstream.Endpoint{}, fmt.Errorf("unexpected registry %q", registry)
		}
		return upstream.Endpoint{Scheme: "http", Host: host}, nil
	}
	return upstream.New(append([]upstream.Option{upstream.WithEndpointResolver(resolve)}, opts...)...)
}

func TestManifestFromRegistry(t *testing.T) {
	host := startRegistry(t)
	image, _ := pushImage(t, host, "test/app", "v1", 2)
	index := pushIndex(t, host, "test/multi", "v1")
	c := newClient(host)

	tests := []struct {
		name      string
		want      pushed
		reference string
	}{
		{"image by tag", image, image.tag},
		{"image by digest", image, image.digest.String()},
		{"index by tag", index, index.tag},
		{"index by digest", index, index.digest.String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			m, err := c.Manifest(ctx, "registry.test", tt.want.repo, tt.reference, nil)
			if err != nil {
				t.Fatalf("Manifest: %v", err)
			}
			if !bytes.Equal(m.Body, tt.want.manifest) {
				t.Errorf("body differs from the pushed manifest")
			}
			if m.Digest != tt.want.digest {
				t.Errorf("digest = %s, want %s", m.Digest, tt.want.digest)
			}
			if m.MediaType != string(tt.want.mediaType) {
				t.Errorf("media type = %q, want %q", m.MediaType, tt.want.mediaType)
			}

			desc, err := c.HeadManifest(ctx, "registry.test", tt.want.repo, tt.reference, nil)
			if err != nil {
				t.Fatalf("HeadManifest: %v", err)
			}
			if desc.Digest != tt.want.digest || desc.Size != int64(len(tt.want.manifest)) || desc.MediaType != tt.want.mediaType {
				t.Errorf("HeadManifest = %+v, want digest %s size %d type %s", desc, tt.want.digest, len(tt.want.manifest), tt.want.mediaType)
			}
		})
	}
}

func TestManifestAcceptIsPassedUpstream(t *testing.T) {
	host := startRegistry(t)
	index := pushIndex(t, host, "test/multi", "v1")
	c := newClient(host)
	ctx := testContext(t)
	// Distribution does not serve an OCI index to a client that does not accept one.
	_, err := c.Manifest(ctx, "registry.test", index.repo, index.tag, []string{"application/vnd.docker.distribution.manifest.v2+json"})
	if !errors.Is(err, upstream.ErrNotFound) {
		t.Errorf("index for a client accepting only image manifests: err = %v, want ErrNotFound", err)
	}
	m, err := c.Manifest(ctx, "registry.test", index.repo, index.tag, []string{string(index.mediaType)})
	if err != nil || m.Digest != index.digest {
		t.Errorf("index for a client accepting indexes: %v, %v", m, err)
	}
}

func TestBlobFromRegistry(t *testing.T) {
	host := startRegistry(t)
	_, img := pushImage(t, host, "test/app", "v1", 1)
	want, digest := layerBytes(t, img)
	size := int64(len(want))
	c := newClient(host)

	tests := []struct {
		name           string
		offset, length int64
		want           []byte
	}{
		{"whole", 0, -1, want},
		{"head of it", 0, 100, want[:100]},
		{"middle", 1000, 4096, want[1000:5096]},
		{"tail to the end", size - 10, -1, want[size-10:]},
		{"range past the end", size - 10, 100, want[size-10:]},
		{"last byte", size - 1, 1, want[size-1:]},
		{"empty", 100, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, total, err := c.Blob(testContext(t), "registry.test", "test/app", digest, tt.offset, tt.length)
			if err != nil {
				t.Fatalf("Blob: %v", err)
			}
			defer body.Close()
			got, err := io.ReadAll(body)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("got %d bytes, want %d (content equal: %v)", len(got), len(tt.want), bytes.Equal(got, tt.want))
			}
			if total != size {
				t.Errorf("total = %d, want %d", total, size)
			}
		})
	}

	got, err := c.HeadBlob(testContext(t), "registry.test", "test/app", digest)
	if err != nil || got != size {
		t.Errorf("HeadBlob = %d, %v; want %d", got, err, size)
	}

	// An offset past the end: the registry answers 416.
	_, _, err = c.Blob(testContext(t), "registry.test", "test/app", digest, size+10, 5)
	if !errors.Is(err, upstream.ErrBadRequest) {
		t.Errorf("range past the end: err = %v, want ErrBadRequest", err)
	}
}

func TestNotFoundFromRegistry(t *testing.T) {
	host := startRegistry(t)
	image, _ := pushImage(t, host, "test/app", "v1", 1)
	c := newClient(host)
	missing := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}

	tests := []struct {
		name     string
		call     func() error
		wantCode string // "" for HEAD: no body, no code
	}{
		{"unknown tag", func() error {
			_, err := c.Manifest(testContext(t), "registry.test", image.repo, "nope", nil)
			return err
		}, "MANIFEST_UNKNOWN"},
		{"unknown manifest digest", func() error {
			_, err := c.Manifest(testContext(t), "registry.test", image.repo, missing.String(), nil)
			return err
		}, "MANIFEST_UNKNOWN"},
		{"unknown repository", func() error {
			_, err := c.Manifest(testContext(t), "registry.test", "test/nothing", "v1", nil)
			return err
		}, "MANIFEST_UNKNOWN"}, // what distribution 2.8 answers
		{"head unknown tag", func() error {
			_, err := c.HeadManifest(testContext(t), "registry.test", image.repo, "nope", nil)
			return err
		}, ""},
		{"unknown blob", func() error {
			_, _, err := c.Blob(testContext(t), "registry.test", image.repo, missing, 0, -1)
			return err
		}, "BLOB_UNKNOWN"},
		{"head unknown blob", func() error {
			_, err := c.HeadBlob(testContext(t), "registry.test", image.repo, missing)
			return err
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if !errors.Is(err, upstream.ErrNotFound) {
				t.Fatalf("err = %v, want ErrNotFound", err)
			}
			for _, other := range []error{upstream.ErrUnavailable, upstream.ErrUnauthorized, upstream.ErrInvalid} {
				if errors.Is(err, other) {
					t.Errorf("err %v also matches %v", err, other)
				}
			}
			var uerr *upstream.Error
			if !errors.As(err, &uerr) {
				t.Fatalf("err %T is not an *upstream.Error", err)
			}
			if uerr.StatusCode != http.StatusNotFound || uerr.Code != tt.wantCode || uerr.Registry != "registry.test" {
				t.Errorf("error = %+v, want status 404 code %q registry registry.test", uerr, tt.wantCode)
			}
			if !strings.Contains(err.Error(), image.repo) && !strings.Contains(err.Error(), "test/nothing") {
				t.Errorf("message %q does not say which repository", err)
			}
		})
	}
}

func TestMetrics(t *testing.T) {
	host := startRegistry(t)
	image, img := pushImage(t, host, "test/app", "v1", 1)
	blob, digest := layerBytes(t, img)
	reg := prometheus.NewRegistry()
	c := newClient(host, upstream.WithRegisterer(reg))
	// A second client on the same registerer reuses the collectors instead of panicking.
	_ = newClient(host, upstream.WithRegisterer(reg))

	ctx := testContext(t)
	if _, err := c.Manifest(ctx, "registry.test", image.repo, image.tag, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Manifest(ctx, "registry.test", image.repo, "missing", nil); !errors.Is(err, upstream.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	body, _, err := c.Blob(ctx, "registry.test", image.repo, digest, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, body); err != nil {
		t.Fatal(err)
	}
	body.Close()

	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	value := func(metric string, labels map[string]string) float64 {
		for _, f := range families {
			if f.GetName() != metric {
				continue
			}
			for _, m := range f.GetMetric() {
				if matches(m, labels) {
					if m.GetCounter() != nil {
						return m.GetCounter().GetValue()
					}
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
		return -1
	}
	checks := []struct {
		metric string
		labels map[string]string
		want   float64
	}{
		{"shoal_upstream_requests_total", map[string]string{"registry": "registry.test", "kind": "manifest", "code": "200"}, 1},
		{"shoal_upstream_requests_total", map[string]string{"registry": "registry.test", "kind": "manifest", "code": "404"}, 1},
		{"shoal_upstream_requests_total", map[string]string{"registry": "registry.test", "kind": "blob", "code": "200"}, 1},
		{"shoal_upstream_requests_total", map[string]string{"registry": "registry.test", "kind": "token", "code": "200"}, 1},
		{"shoal_upstream_request_duration_seconds", map[string]string{"registry": "registry.test", "kind": "manifest"}, 2},
		{"shoal_upstream_bytes_total", map[string]string{"registry": "registry.test"}, float64(len(image.manifest) + len(blob))},
	}
	for _, ch := range checks {
		if got := value(ch.metric, ch.labels); got != ch.want {
			t.Errorf("%s%v = %v, want %v", ch.metric, ch.labels, got, ch.want)
		}
	}
}

func matches(m *dto.Metric, labels map[string]string) bool {
	n := 0
	for _, l := range m.GetLabel() {
		if want, ok := labels[l.GetName()]; ok {
			if want != l.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(labels)
}

func TestBadRequestsAreNotSent(t *testing.T) {
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	c := newClient(strings.TrimPrefix(srv.URL, "http://"))
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}

	tests := []struct {
		name string
		call func() error
	}{
		{"dot-dot repository", func() error {
			_, err := c.Manifest(testContext(t), "registry.test", "../etc", "v1", nil)
			return err
		}},
		{"bad tag", func() error {
			_, err := c.Manifest(testContext(t), "registry.test", "test/app", "a/../b", nil)
			return err
		}},
		{"bad digest", func() error {
			_, err := c.HeadManifest(testContext(t), "registry.test", "test/app", "sha256:xyz", nil)
			return err
		}},
		{"bad registry", func() error {
			_, err := c.HeadBlob(testContext(t), "registry.test/evil", "test/app", d)
			return err
		}},
		{"blob digest of another algorithm", func() error {
			_, _, err := c.Blob(testContext(t), "registry.test", "test/app", v1.Hash{Algorithm: "md5", Hex: "00"}, 0, -1)
			return err
		}},
		{"negative offset", func() error {
			_, _, err := c.Blob(testContext(t), "registry.test", "test/app", d, -1, 10)
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); !errors.Is(err, upstream.ErrBadRequest) {
				t.Errorf("err = %v, want ErrBadRequest", err)
			}
		})
	}
	if n := requests.Load(); n != 0 {
		t.Errorf("%d requests reached the registry", n)
	}
}
