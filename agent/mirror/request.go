package mirror

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/internal/oci"
)

// Kind is what a Distribution API request asks for.
type Kind int

// The request kinds the pull side of the Distribution API has.
const (
	KindBase     Kind = iota + 1 // GET /v2/: API version check
	KindManifest                 // /v2/<name>/manifests/<reference>
	KindBlob                     // /v2/<name>/blobs/<digest>
)

func (k Kind) String() string {
	switch k {
	case KindBase:
		return "base"
	case KindManifest:
		return "manifest"
	case KindBlob:
		return "blob"
	}
	return "unknown"
}

// Request is a validated pull-side Distribution API request.
type Request struct {
	Kind Kind
	// Registry is the upstream registry the request is for: containerd's ?ns= or the default.
	Registry string
	// Repository is the repository name, e.g. "library/alpine".
	Repository string
	// Reference is the tag or digest of a manifest request, or the digest of a blob request.
	Reference string
	// Digest is set when Reference is a digest (always for blobs).
	Digest v1.Hash
	// HasDigest reports whether Digest is set.
	HasDigest bool
}

// requestError is a request the mirror refuses, with the OCI error code and HTTP status to answer.
type requestError struct {
	status int
	code   string
	err    error
}

func (e *requestError) Error() string { return e.err.Error() }
func (e *requestError) Unwrap() error { return e.err }

func badRequest(status int, code string, format string, args ...any) error {
	return &requestError{status: status, code: code, err: fmt.Errorf(format, args...)}
}

// maxPathLength bounds the request path: a repository (255) plus the longest reference and framing.
const maxPathLength = 1024

// ParseRequest validates an incoming request. Names and references are checked against the
// Distribution grammar before anything else looks at them; encoded characters are refused
// outright because no valid name or reference needs them, so "%2F" or "%2e%2e" cannot smuggle
// a path. defaultRegistry is used when the client sends no ?ns=.
func ParseRequest(method string, u *url.URL, defaultRegistry string) (*Request, error) {
	if method != http.MethodGet && method != http.MethodHead {
		return nil, badRequest(http.StatusMethodNotAllowed, "UNSUPPORTED", "method %s not allowed: this mirror is pull-only", method)
	}
	path := u.EscapedPath()
	if len(path) > maxPathLength {
		return nil, badRequest(http.StatusBadRequest, "NAME_INVALID", "request path of %d bytes is too long", len(path))
	}
	if strings.ContainsAny(path, "%\\") || u.RawPath != "" {
		return nil, badRequest(http.StatusBadRequest, "NAME_INVALID", "encoded characters are not allowed in the request path")
	}
	registry := defaultRegistry
	if u.RawQuery != "" {
		query, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			return nil, badRequest(http.StatusBadRequest, "UNSUPPORTED", "malformed query: %v", err)
		}
		if ns := query["ns"]; len(ns) > 1 {
			return nil, badRequest(http.StatusBadRequest, "UNSUPPORTED", "more than one ns parameter")
		} else if len(ns) == 1 {
			registry = ns[0]
		}
	}
	if err := oci.ValidateRegistry(registry); err != nil {
		return nil, badRequest(http.StatusBadRequest, "NAME_INVALID", "ns: %v", err)
	}

	if path == "/v2" || path == "/v2/" {
		return &Request{Kind: KindBase, Registry: registry}, nil
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return nil, badRequest(http.StatusNotFound, "UNSUPPORTED", "not a Distribution API path")
	}
	// Repository names may contain "manifests" or "blobs" as components: the endpoint is the
	// separator that occurs last.
	req := &Request{Registry: registry}
	manifests, blobs := strings.LastIndex(rest, "/manifests/"), strings.LastIndex(rest, "/blobs/")
	var reference string
	switch {
	case manifests > blobs:
		req.Kind, req.Repository, reference = KindManifest, rest[:manifests], rest[manifests+len("/manifests/"):]
	case blobs > manifests:
		req.Kind, req.Repository, reference = KindBlob, rest[:blobs], rest[blobs+len("/blobs/"):]
	default:
		return nil, badRequest(http.StatusNotFound, "UNSUPPORTED", "unsupported Distribution API endpoint")
	}
	if err := oci.ValidateRepository(req.Repository); err != nil {
		return nil, badRequest(http.StatusBadRequest, "NAME_INVALID", "%v", err)
	}
	req.Reference = reference

	if req.Kind == KindManifest && !oci.IsDigest(reference) {
		if err := oci.ValidateTag(reference); err != nil {
			// No manifest can exist under a malformed tag, and the Distribution spec answers a
			// manifest that does not exist with 404; the agent knows without asking upstream.
			return nil, badRequest(http.StatusNotFound, "MANIFEST_UNKNOWN", "manifest unknown: %v", err)
		}
		return req, nil
	}
	digest, err := oci.ParseDigest(reference)
	if err != nil {
		code := "DIGEST_INVALID"
		if errors.Is(err, oci.ErrUnsupportedDigest) {
			code = "UNSUPPORTED"
		}
		return nil, badRequest(http.StatusBadRequest, code, "%v", err)
	}
	req.Digest, req.HasDigest = digest, true
	return req, nil
}
