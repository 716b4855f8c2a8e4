package upstream

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-dev/shoal/internal/oci"
)

// Manifest is a manifest (or index) as the registry served it.
type Manifest struct {
	// Body is the manifest, byte for byte.
	Body []byte
	// MediaType is the registry's Content-Type, or the body's own media type when the registry
	// sent none or a generic one; "" if neither says.
	MediaType string
	// Digest is computed from Body.
	Digest v1.Hash
}

// Manifest fetches a manifest by tag or digest, sending accept (default: the OCI and Docker
// manifest and index types) upstream. A manifest fetched by digest must hash to it, and any
// manifest must match the Docker-Content-Digest the registry sent; bodies over
// oci.MaxManifestSize are refused. The whole fetch is bounded by the Manifest timeout.
func (c *Client) Manifest(ctx context.Context, registry, repo, reference string, accept []string) (*Manifest, error) {
	t, want, op, err := c.manifestTarget("get", registry, repo, reference)
	if err != nil {
		return nil, err
	}
	ctx, cancel := c.manifestContext(ctx)
	defer cancel()
	m, merr := c.getManifest(ctx, t, op, reference, want, accept)
	if merr != nil {
		return nil, merr
	}
	return m, nil
}

// HeadManifest resolves a reference to a descriptor with a HEAD request, falling back to a GET
// when the registry does not allow HEAD or leaves out the digest, size or media type.
func (c *Client) HeadManifest(ctx context.Context, registry, repo, reference string, accept []string) (v1.Descriptor, error) {
	t, want, op, err := c.manifestTarget("head", registry, repo, reference)
	if err != nil {
		return v1.Descriptor{}, err
	}
	ctx, cancel := c.manifestContext(ctx)
	defer cancel()
	resp, derr := c.do(ctx, t, kindManifest, op, http.MethodHead, manifestPath(repo, reference), acceptHeader(accept))
	if derr != nil {
		return v1.Descriptor{}, derr
	}
	defer resp.Body.Close()

	fallback := false
	var desc v1.Descriptor
	switch resp.StatusCode {
	case http.StatusOK:
		desc.Size = resp.ContentLength
		desc.MediaType = types.MediaType(headerMediaType(resp.Header))
		if want != nil {
			desc.Digest = *want
		}
		if h := resp.Header.Get("Docker-Content-Digest"); h != "" {
			got, err := v1.NewHash(h)
			if err != nil {
				return v1.Descriptor{}, t.fail(op, resp.StatusCode, "", ErrInvalid, fmt.Errorf("bad Docker-Content-Digest %q: %w", h, err))
			}
			if want != nil && got != *want {
				return v1.Descriptor{}, t.fail(op, resp.StatusCode, "", ErrInvalid, fmt.Errorf("registry says the manifest is %s", got))
			}
			desc.Digest = got
		}
		if desc.Size > oci.MaxManifestSize {
			return v1.Descriptor{}, t.fail(op, resp.StatusCode, "", ErrInvalid, fmt.Errorf("manifest of %d bytes is over the %d byte limit", desc.Size, oci.MaxManifestSize))
		}
		fallback = desc.Size < 0 || desc.Digest == (v1.Hash{}) || desc.MediaType == ""
	case http.StatusMethodNotAllowed, http.StatusNotImplemented:
		fallback = true
	default:
		status, code, cause := responseError(resp)
		return v1.Descriptor{}, t.fail(op, status, code, statusKind(status, code), cause)
	}
	if !fallback {
		return desc, nil
	}
	m, merr := c.getManifest(ctx, t, "get manifest "+refString(repo, reference), reference, want, accept)
	if merr != nil {
		return v1.Descriptor{}, merr
	}
	return v1.Descriptor{MediaType: types.MediaType(m.MediaType), Size: int64(len(m.Body)), Digest: m.Digest}, nil
}

// manifestTarget validates a manifest request; want is the digest when reference is one.
func (c *Client) manifestTarget(verb, registry, repo, reference string) (t target, want *v1.Hash, op string, _ error) {
	op = verb + " manifest " + refString(repo, reference)
	t, terr := c.target(registry, repo)
	if terr != nil {
		terr.Op = op
		return t, nil, op, terr
	}
	if oci.IsDigest(reference) {
		d, err := oci.ParseDigest(reference)
		if err != nil {
			return t, nil, op, t.fail(op, 0, "", ErrBadRequest, err)
		}
		return t, &d, op, nil
	}
	if err := oci.ValidateTag(reference); err != nil {
		return t, nil, op, t.fail(op, 0, "", ErrBadRequest, err)
	}
	return t, nil, op, nil
}

func (c *Client) manifestContext(ctx context.Context) (context.Context, context.CancelFunc) {
	d := c.timeouts.Manifest
	return context.WithTimeoutCause(ctx, d, fmt.Errorf("manifest not received within %s: %w", d, context.DeadlineExceeded))
}

func (c *Client) getManifest(ctx context.Context, t target, op, reference string, want *v1.Hash, accept []string) (*Manifest, *Error) {
	resp, derr := c.do(ctx, t, kindManifest, op, http.MethodGet, manifestPath(t.repo, reference), acceptHeader(accept))
	if derr != nil {
		return nil, derr
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		status, code, cause := responseError(resp)
		return nil, t.fail(op, status, code, statusKind(status, code), cause)
	}
	invalid := func(format string, args ...any) *Error {
		return t.fail(op, resp.StatusCode, "", ErrInvalid, fmt.Errorf(format, args...))
	}
	if resp.ContentLength > oci.MaxManifestSize {
		return nil, invalid("manifest of %d bytes is over the %d byte limit", resp.ContentLength, oci.MaxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, oci.MaxManifestSize+1))
	c.metrics.received(t.registry).Add(float64(len(body)))
	if err != nil {
		if cause := context.Cause(ctx); cause != nil {
			err = cause
		}
		return nil, t.fail(op, resp.StatusCode, "", failureKind(err), fmt.Errorf("read body: %w", err))
	}
	if len(body) > oci.MaxManifestSize {
		return nil, invalid("manifest is over the %d byte limit", oci.MaxManifestSize)
	}

	digest, _ := digestOf(body, "sha256") // oci.ParseDigest admits only sha256 references
	if want != nil && digest != *want {
		return nil, invalid("body hashes to %s, not to the requested digest", digest)
	}
	if h := resp.Header.Get("Docker-Content-Digest"); h != "" {
		claimed, err := v1.NewHash(h)
		if err != nil {
			return nil, invalid("bad Docker-Content-Digest %q: %w", h, err)
		}
		got, err := digestOf(body, claimed.Algorithm)
		if err != nil {
			return nil, invalid("%v", err)
		}
		if got != claimed {
			return nil, invalid("body hashes to %s but Docker-Content-Digest says %s", got, claimed)
		}
	}
	mediaType := headerMediaType(resp.Header)
	if generic(mediaType) {
		if own := oci.ManifestMediaType(body); own != "" {
			mediaType = own
		}
	}
	return &Manifest{Body: body, MediaType: mediaType, Digest: digest}, nil
}

func manifestPath(repo, reference string) string {
	return "/v2/" + repo + "/manifests/" + reference
}

// refString writes a reference the way people read it: repo:tag or repo@digest.
func refString(repo, reference string) string {
	if oci.IsDigest(reference) {
		return repo + "@" + reference
	}
	return repo + ":" + reference
}

func acceptHeader(accept []string) http.Header {
	if len(accept) == 0 {
		accept = oci.ManifestMediaTypes
	}
	return http.Header{"Accept": {strings.Join(accept, ", ")}}
}

// headerMediaType is the response's Content-Type without parameters.
func headerMediaType(h http.Header) string {
	mt, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return mt
}

// generic reports whether a Content-Type says nothing about which kind of manifest it is.
func generic(mediaType string) bool {
	switch mediaType {
	case "", "application/json", "text/plain", "application/octet-stream":
		return true
	}
	return false
}

func digestOf(body []byte, algorithm string) (v1.Hash, error) {
	h, err := v1.Hasher(algorithm)
	if err != nil {
		return v1.Hash{}, err
	}
	h.Write(body)
	return v1.Hash{Algorithm: algorithm, Hex: hex.EncodeToString(h.Sum(nil))}, nil
}
