package upstream_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/upstream"
)

func sha256Of(b []byte) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", sha256.Sum256(b))}
}

const ociManifest = "application/vnd.oci.image.manifest.v1+json"

func TestManifestValidation(t *testing.T) {
	good := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{},"layers":[]}`)
	other := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{},"layers":[{}]}`)
	huge := bytes.Repeat([]byte(" "), 4<<20+1)

	tests := []struct {
		name      string
		reference string
		body      []byte
		header    map[string]string
		chunked   bool // no Content-Length
		want      error
	}{
		{"by digest, body matches", sha256Of(good).String(), good, nil, false, nil},
		{"by digest, another body", sha256Of(good).String(), other, nil, false, upstream.ErrInvalid},
		{"by tag, Docker-Content-Digest matches", "v1", good, map[string]string{"Docker-Content-Digest": sha256Of(good).String()}, false, nil},
		{"by tag, Docker-Content-Digest differs", "v1", good, map[string]string{"Docker-Content-Digest": sha256Of(other).String()}, false, upstream.ErrInvalid},
		{"by tag, Docker-Content-Digest garbage", "v1", good, map[string]string{"Docker-Content-Digest": "sha256:nothex"}, false, upstream.ErrInvalid},
		{"oversized with Content-Length", "v1", huge, nil, false, upstream.ErrInvalid},
		{"oversized without Content-Length", "v1", huge, nil, true, upstream.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tt.header {
					w.Header().Set(k, v)
				}
				w.Header().Set("Content-Type", ociManifest)
				if !tt.chunked {
					w.Header().Set("Content-Length", strconv.Itoa(len(tt.body)))
				}
				_, _ = w.Write(tt.body)
			})
			m, err := newClient(host).Manifest(testContext(t), "registry.test", "test/app", tt.reference, nil)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Manifest: %v", err)
				}
				if !bytes.Equal(m.Body, tt.body) || m.Digest != sha256Of(tt.body) || m.MediaType != ociManifest {
					t.Errorf("Manifest = %d bytes, %s, %q", len(m.Body), m.Digest, m.MediaType)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestManifestMediaTypeFromBody(t *testing.T) {
	index := []byte(`{"schemaVersion":2,"manifests":[]}`)
	host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = w.Write(index)
	})
	m, err := newClient(host).Manifest(testContext(t), "registry.test", "test/app", "v1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Errorf("media type = %q, want the OCI index type the body implies", m.MediaType)
	}
}

func TestHeadManifestFallsBackToGet(t *testing.T) {
	body := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{},"layers":[]}`)
	tests := []struct {
		name string
		head func(w http.ResponseWriter)
	}{
		{"HEAD not allowed", func(w http.ResponseWriter) { w.WriteHeader(http.StatusMethodNotAllowed) }},
		{"HEAD without digest", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", ociManifest)
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gets atomic.Int32
			host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodHead {
					tt.head(w)
					return
				}
				gets.Add(1)
				w.Header().Set("Content-Type", ociManifest)
				_, _ = w.Write(body)
			})
			desc, err := newClient(host).HeadManifest(testContext(t), "registry.test", "test/app", "v1", nil)
			if err != nil {
				t.Fatal(err)
			}
			if desc.Digest != sha256Of(body) || desc.Size != int64(len(body)) || desc.MediaType != ociManifest {
				t.Errorf("HeadManifest = %+v", desc)
			}
			if gets.Load() != 1 {
				t.Errorf("%d GETs, want 1", gets.Load())
			}
		})
	}
}

func TestBlobRangeAnswers(t *testing.T) {
	data := []byte(strings.Repeat("0123456789", 100))
	total := int64(len(data))
	tests := []struct {
		name           string
		offset, length int64
		handle         http.HandlerFunc
		want           []byte
		wantErr        error
	}{
		{
			name: "range ignored, offset 0", offset: 0, length: 10,
			handle:  func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(data) },
			wantErr: upstream.ErrRangeUnsupported,
		},
		{
			name: "range ignored, later offset", offset: 10, length: 10,
			handle:  func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(data) },
			wantErr: upstream.ErrRangeUnsupported,
		},
		{
			name: "wrong start", offset: 10, length: 10,
			handle:  partial(data, 0, 9),
			wantErr: upstream.ErrInvalid,
		},
		{
			name: "short range", offset: 10, length: 10,
			handle:  partial(data, 10, 15),
			wantErr: upstream.ErrInvalid,
		},
		{
			name: "garbage Content-Range", offset: 10, length: 10,
			handle: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Range", "bytes ten-twenty/1000")
				w.WriteHeader(http.StatusPartialContent)
			},
			wantErr: upstream.ErrInvalid,
		},
		{
			name: "served by http.ServeContent", offset: 990, length: 100,
			handle: func(w http.ResponseWriter, r *http.Request) {
				http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
			},
			want: data[990:],
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := fakeRegistry(t, tt.handle)
			body, size, err := newClient(host).Blob(testContext(t), "registry.test", "test/app", someDigest, tt.offset, tt.length)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Errorf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer body.Close()
			got, err := io.ReadAll(body)
			if err != nil || !bytes.Equal(got, tt.want) || size != total {
				t.Errorf("got %q (total %d), %v; want %q (total %d)", got, size, err, tt.want, total)
			}
		})
	}
}

// partial answers 206 with bytes [start, end] of data whatever was asked for.
func partial(data []byte, start, end int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end, len(data)))
		w.Header().Set("Content-Length", strconv.Itoa(end-start+1))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(data[start : end+1])
	}
}

func TestHTTPSEndpoint(t *testing.T) {
	body := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{},"layers":[]}`)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		w.Header().Set("Content-Type", ociManifest)
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	endpoint, err := upstream.ParseEndpoint(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	c := upstream.New(
		upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) { return endpoint, nil }),
		upstream.WithTransport(srv.Client().Transport))
	m, err := c.Manifest(testContext(t), "registry.test", "test/app", "v1", nil)
	if err != nil || m.Digest != sha256Of(body) {
		t.Fatalf("Manifest over https: %v, %v", m, err)
	}
}
