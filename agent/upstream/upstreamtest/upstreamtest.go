// Package upstreamtest is the conformance suite of the upstream registry contract: what the
// mirror and the swarm rely on of their upstream (manifests by tag and digest, HEAD agreeing with
// GET, whole and ranged blobs, and the upstream package's kinds of error). The real
// upstream.Client, talking to a real registry, and the in-memory upstream.Memory both run it,
// so that tests written against the fake hold against the real thing. It is test code: nothing
// that ships imports it (internal/depcheck).
package upstreamtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/oci"
)

// Upstream is what the suite checks: every call of the mirror's and the swarm's Upstream
// interfaces.
type Upstream interface {
	Manifest(ctx context.Context, registry, repo, reference string, accept []string) (*upstream.Manifest, error)
	HeadManifest(ctx context.Context, registry, repo, reference string, accept []string) (v1.Descriptor, error)
	Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error)
	HeadBlob(ctx context.Context, registry, repo string, d v1.Hash) (int64, error)
}

// Fixture is what an upstream under test must serve, and how.
type Fixture struct {
	// Registry and Repository name where the content is.
	Registry, Repository string
	// Blobs are served as blobs of the repository, by their sha256 digest.
	Blobs [][]byte
	// Manifests are served by digest and by tag, in an order they can be pushed to a registry
	// in: each one after the manifests and blobs it references.
	Manifests []Manifest
	// Tampered is served as the manifest Tampered.Digest although its body does not hash to
	// it, as a broken or malicious registry would.
	Tampered Manifest
	// IgnoreRange asks for a registry that answers every blob request with the whole blob.
	IgnoreRange bool
}

// Manifest is a manifest of a Fixture.
type Manifest struct {
	Tag       string
	MediaType types.MediaType
	Body      []byte
	// Digest is the body's sha256 digest, except for a Fixture's Tampered manifest.
	Digest v1.Hash
}

// Registry and Repository of the suite's fixtures.
const (
	Registry   = "registry.test"
	Repository = "conformance/app"
)

// Run runs the suite as subtests of t. newUpstream returns an upstream that serves f as f says;
// it is called once for a fixture whose registry honours Range and once for one that does not.
func Run(t *testing.T, newUpstream func(t *testing.T, f Fixture) Upstream) {
	t.Helper()
	f := NewFixture()
	t.Run("Ranges", func(t *testing.T) { runContract(t, f, newUpstream(t, f)) })
	ignoring := NewFixture()
	ignoring.IgnoreRange = true
	t.Run("RangeIgnored", func(t *testing.T) { runIgnoredRange(t, ignoring, newUpstream(t, ignoring)) })
}

// NewFixture returns the suite's content: a layer of 300 KiB and 7 bytes (not a multiple of any
// buffer size) and an image config, an OCI image manifest referencing them (tag "v1"), an OCI
// index referencing the image (tag "multi"), and a tampered manifest. The bytes are the same
// at every call, so that a failure reproduces.
func NewFixture() Fixture {
	rng := rand.New(rand.NewChaCha8([32]byte{'u', 'p', 's', 't', 'r', 'e', 'a', 'm'}))
	layer := make([]byte, 300<<10+7)
	for i := range layer {
		layer[i] = byte(rng.Uint32())
	}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	image := mustJSON(map[string]any{
		"schemaVersion": 2,
		"mediaType":     oci.MediaTypeOCIManifest,
		"config":        descriptor("application/vnd.oci.image.config.v1+json", config),
		"layers":        []any{descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)},
	})
	index := mustJSON(map[string]any{
		"schemaVersion": 2,
		"mediaType":     oci.MediaTypeOCIIndex,
		"manifests": []any{func() map[string]any {
			d := descriptor(oci.MediaTypeOCIManifest, image)
			d["platform"] = map[string]string{"architecture": "amd64", "os": "linux"}
			return d
		}()},
	})
	return Fixture{
		Registry:   Registry,
		Repository: Repository,
		Blobs:      [][]byte{layer, config},
		Manifests: []Manifest{
			{Tag: "v1", MediaType: oci.MediaTypeOCIManifest, Body: image, Digest: digest(image)},
			{Tag: "multi", MediaType: oci.MediaTypeOCIIndex, Body: index, Digest: digest(index)},
		},
		Tampered: Manifest{MediaType: oci.MediaTypeOCIManifest, Body: image, Digest: digest([]byte("not the image"))},
	}
}

func descriptor(mediaType string, content []byte) map[string]any {
	return map[string]any{"mediaType": mediaType, "size": len(content), "digest": digest(content).String()}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // maps of strings and numbers always marshal
	}
	return b
}

func digest(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

// kinds are the upstream package's kinds of error; an error matches at most one.
var kinds = []error{
	upstream.ErrNotFound, upstream.ErrUnauthorized, upstream.ErrUnavailable, upstream.ErrInvalid,
	upstream.ErrRangeUnsupported, upstream.ErrBadRequest,
}

// wantKind reports an error unless err is an *upstream.Error for registry matching kind and no
// other kind (kind nil: none of them).
func wantKind(t *testing.T, what string, err, kind error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no error, want %v", what, kind)
		return
	}
	var uerr *upstream.Error
	if !errors.As(err, &uerr) {
		t.Errorf("%s: error %T (%v) is not an *upstream.Error", what, err, err)
	} else if uerr.Registry != Registry {
		t.Errorf("%s: error names registry %q, want %q", what, uerr.Registry, Registry)
	}
	if kind != nil && !errors.Is(err, kind) {
		t.Errorf("%s: err = %v, want %v", what, err, kind)
	}
	for _, other := range kinds {
		if !errors.Is(other, kind) && errors.Is(err, other) {
			t.Errorf("%s: err %v also matches %v", what, err, other)
		}
	}
}

// readBlob reads a whole Blob answer.
func readBlob(t *testing.T, up Upstream, d v1.Hash, offset, length int64) (body []byte, size int64, err error) {
	t.Helper()
	rc, size, err := up.Blob(t.Context(), Registry, Repository, d, offset, length)
	if err != nil {
		return nil, 0, err
	}
	defer rc.Close()
	body, err = io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read blob %s from %d (length %d): %v", d, offset, length, err)
	}
	return body, size, nil
}

// runContract checks everything but an ignored Range on an upstream serving f.
func runContract(t *testing.T, f Fixture, up Upstream) {
	t.Run("ManifestByTagAndDigest", func(t *testing.T) {
		for _, want := range f.Manifests {
			for _, ref := range []string{want.Tag, want.Digest.String()} {
				m, err := up.Manifest(t.Context(), Registry, Repository, ref, nil)
				if err != nil {
					t.Errorf("Manifest %s: %v", ref, err)
					continue
				}
				if !bytes.Equal(m.Body, want.Body) || m.Digest != want.Digest || m.MediaType != string(want.MediaType) {
					t.Errorf("Manifest %s = %s %s (%d bytes), want %s %s (%d bytes)", ref,
						m.MediaType, m.Digest, len(m.Body), want.MediaType, want.Digest, len(want.Body))
				}
			}
		}
	})
	t.Run("HeadManifestEqualsGet", func(t *testing.T) {
		for _, want := range f.Manifests {
			for _, ref := range []string{want.Tag, want.Digest.String()} {
				m, err := up.Manifest(t.Context(), Registry, Repository, ref, nil)
				if err != nil {
					t.Fatalf("Manifest %s: %v", ref, err)
				}
				desc, err := up.HeadManifest(t.Context(), Registry, Repository, ref, nil)
				if err != nil {
					t.Errorf("HeadManifest %s: %v", ref, err)
					continue
				}
				got := v1.Descriptor{MediaType: desc.MediaType, Size: desc.Size, Digest: desc.Digest}
				get := v1.Descriptor{MediaType: types.MediaType(m.MediaType), Size: int64(len(m.Body)), Digest: m.Digest}
				if got.MediaType != get.MediaType || got.Size != get.Size || got.Digest != get.Digest {
					t.Errorf("HeadManifest %s = %s %d %s, GET says %s %d %s", ref,
						got.MediaType, got.Size, got.Digest, get.MediaType, get.Size, get.Digest)
				}
			}
		}
	})
	t.Run("Accept", func(t *testing.T) {
		for _, want := range f.Manifests {
			m, err := up.Manifest(t.Context(), Registry, Repository, want.Tag, []string{string(want.MediaType)})
			if err != nil || m.Digest != want.Digest {
				t.Errorf("Manifest %s accepting %s: %v, %v", want.Tag, want.MediaType, m, err)
			}
			// Distribution serves neither an OCI manifest nor an OCI index to a client that
			// does not list its type: the runtime could not parse it.
			dockerOnly := []string{oci.MediaTypeDockerManifest}
			_, err = up.Manifest(t.Context(), Registry, Repository, want.Tag, dockerOnly)
			wantKind(t, fmt.Sprintf("Manifest %s (%s) accepting only %v", want.Tag, want.MediaType, dockerOnly), err, upstream.ErrNotFound)
			_, err = up.HeadManifest(t.Context(), Registry, Repository, want.Tag, dockerOnly)
			wantKind(t, fmt.Sprintf("HeadManifest %s (%s) accepting only %v", want.Tag, want.MediaType, dockerOnly), err, upstream.ErrNotFound)
		}
	})
	t.Run("UnknownManifest", func(t *testing.T) {
		missing := digest([]byte("no such manifest")).String()
		for _, c := range []struct{ repo, ref string }{
			{Repository, "nope"}, {Repository, missing}, {Repository + "-nothing", "v1"},
		} {
			_, err := up.Manifest(t.Context(), Registry, c.repo, c.ref, nil)
			wantKind(t, "Manifest "+c.repo+" "+c.ref, err, upstream.ErrNotFound)
			_, err = up.HeadManifest(t.Context(), Registry, c.repo, c.ref, nil)
			wantKind(t, "HeadManifest "+c.repo+" "+c.ref, err, upstream.ErrNotFound)
		}
	})
	t.Run("TamperedManifest", func(t *testing.T) {
		_, err := up.Manifest(t.Context(), Registry, Repository, f.Tampered.Digest.String(), nil)
		wantKind(t, "Manifest by a digest its body does not hash to", err, upstream.ErrInvalid)
	})
	t.Run("WholeBlob", func(t *testing.T) {
		for _, want := range f.Blobs {
			d := digest(want)
			got, size, err := readBlob(t, up, d, 0, -1)
			if err != nil || !bytes.Equal(got, want) || size != int64(len(want)) {
				t.Errorf("Blob %s: %d bytes (equal %v), size %d, err %v; want %d bytes", d, len(got), bytes.Equal(got, want), size, err, len(want))
			}
			size, err = up.HeadBlob(t.Context(), Registry, Repository, d)
			if err != nil || size != int64(len(want)) {
				t.Errorf("HeadBlob %s = %d, %v; want %d", d, size, err, len(want))
			}
		}
	})
	layer := f.Blobs[0]
	d, size := digest(layer), int64(len(layer))
	t.Run("BlobRanges", func(t *testing.T) {
		for _, c := range []struct {
			name           string
			offset, length int64
			want           []byte
		}{
			{"head", 0, 100, layer[:100]},
			{"middle", 1000, 4096, layer[1000:5096]},
			{"to the end", size - 10, -1, layer[size-10:]},
			{"ending past the end", size - 10, 100, layer[size-10:]},
			{"last byte", size - 1, 1, layer[size-1:]},
			{"all of it, by length", 0, size, layer},
			{"nothing", 100, 0, nil},
			{"nothing, past the end", size + 10, 0, nil},
		} {
			got, gotSize, err := readBlob(t, up, d, c.offset, c.length)
			if err != nil || !bytes.Equal(got, c.want) || gotSize != size {
				t.Errorf("Blob %s (offset %d, length %d): %d bytes (equal %v), size %d, err %v; want %d bytes, size %d",
					c.name, c.offset, c.length, len(got), bytes.Equal(got, c.want), gotSize, err, len(c.want), size)
			}
		}
	})
	t.Run("RangeStartingPastTheEnd", func(t *testing.T) {
		for _, offset := range []int64{size, size + 10} {
			_, _, err := up.Blob(t.Context(), Registry, Repository, d, offset, 5)
			wantKind(t, fmt.Sprintf("Blob from %d of a blob of %d", offset, size), err, upstream.ErrBadRequest)
		}
	})
	t.Run("UnknownBlob", func(t *testing.T) {
		missing := digest([]byte("no such blob"))
		for _, c := range []struct {
			repo string
			d    v1.Hash
		}{{Repository, missing}, {Repository + "-nothing", d}} {
			_, _, err := up.Blob(t.Context(), Registry, c.repo, c.d, 0, -1)
			wantKind(t, "Blob "+c.repo+"@"+c.d.String(), err, upstream.ErrNotFound)
			_, _, err = up.Blob(t.Context(), Registry, c.repo, c.d, 10, 10)
			wantKind(t, "ranged Blob "+c.repo+"@"+c.d.String(), err, upstream.ErrNotFound)
			_, err = up.HeadBlob(t.Context(), Registry, c.repo, c.d)
			wantKind(t, "HeadBlob "+c.repo+"@"+c.d.String(), err, upstream.ErrNotFound)
		}
	})
	t.Run("BadRequests", func(t *testing.T) {
		calls := map[string]func() error{
			"dot-dot repository": func() error {
				_, err := up.Manifest(t.Context(), Registry, "../etc", "v1", nil)
				return err
			},
			"bad tag": func() error {
				_, err := up.Manifest(t.Context(), Registry, Repository, "a/../b", nil)
				return err
			},
			"bad digest reference": func() error {
				_, err := up.HeadManifest(t.Context(), Registry, Repository, "sha256:xyz", nil)
				return err
			},
			"blob digest of another algorithm": func() error {
				_, _, err := up.Blob(t.Context(), Registry, Repository, v1.Hash{Algorithm: "md5", Hex: "00"}, 0, -1)
				return err
			},
			"negative offset": func() error {
				_, _, err := up.Blob(t.Context(), Registry, Repository, d, -1, 10)
				return err
			},
			"length below -1": func() error {
				_, _, err := up.Blob(t.Context(), Registry, Repository, d, 0, -2)
				return err
			},
		}
		for name, call := range calls {
			wantKind(t, name, call(), upstream.ErrBadRequest)
		}
	})
	t.Run("CanceledContext", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		_, err := up.Manifest(ctx, Registry, Repository, f.Manifests[0].Tag, nil)
		wantKind(t, "Manifest with a canceled context", err, nil)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Manifest with a canceled context: err = %v, want context.Canceled", err)
		}
		_, _, err = up.Blob(ctx, Registry, Repository, d, 0, -1)
		wantKind(t, "Blob with a canceled context", err, nil)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Blob with a canceled context: err = %v, want context.Canceled", err)
		}
	})
}

// runIgnoredRange checks an upstream serving f from a registry that ignores Range: a whole blob
// is still served, and every ranged request fails at once with ErrRangeUnsupported so that the
// caller falls back to one whole download.
func runIgnoredRange(t *testing.T, f Fixture, up Upstream) {
	layer := f.Blobs[0]
	d, size := digest(layer), int64(len(layer))
	got, gotSize, err := readBlob(t, up, d, 0, -1)
	if err != nil || !bytes.Equal(got, layer) || gotSize != size {
		t.Errorf("whole Blob: %d bytes, size %d, err %v; want %d bytes", len(got), gotSize, err, size)
	}
	for _, c := range []struct{ offset, length int64 }{{0, 100}, {1000, 4096}, {size - 10, -1}, {size + 10, 5}} {
		_, _, err := up.Blob(t.Context(), Registry, Repository, d, c.offset, c.length)
		wantKind(t, fmt.Sprintf("Blob (offset %d, length %d)", c.offset, c.length), err, upstream.ErrRangeUnsupported)
	}
}
