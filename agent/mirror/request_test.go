package mirror

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/shoal-dev/shoal/internal/oci"
)

var testDigest = "sha256:" + strings.Repeat("0123456789abcdef", 4)

func TestParseRequest(t *testing.T) {
	tests := []struct {
		name, method, target string
		want                 Request
		status               int
		code                 string
	}{
		{name: "base", method: "GET", target: "/v2/", want: Request{Kind: KindBase, Registry: "docker.io"}},
		{name: "base no slash", method: "HEAD", target: "/v2", want: Request{Kind: KindBase, Registry: "docker.io"}},
		{name: "manifest by tag", method: "GET", target: "/v2/library/alpine/manifests/3.20?ns=docker.io",
			want: Request{Kind: KindManifest, Registry: "docker.io", Repository: "library/alpine", Reference: "3.20"}},
		{name: "manifest by digest", method: "HEAD", target: "/v2/app/manifests/" + testDigest + "?ns=registry.test:5000",
			want: Request{Kind: KindManifest, Registry: "registry.test:5000", Repository: "app", Reference: testDigest, HasDigest: true}},
		{name: "blob", method: "GET", target: "/v2/a/b/c/blobs/" + testDigest + "?ns=registry.test",
			want: Request{Kind: KindBlob, Registry: "registry.test", Repository: "a/b/c", Reference: testDigest, HasDigest: true}},
		{name: "repository named like an endpoint", method: "GET", target: "/v2/blobs/manifests/blobs/" + testDigest,
			want: Request{Kind: KindBlob, Registry: "docker.io", Repository: "blobs/manifests", Reference: testDigest, HasDigest: true}},
		{name: "put", method: "PUT", target: "/v2/a/manifests/x", status: 405, code: "UNSUPPORTED"},
		{name: "post upload", method: "POST", target: "/v2/a/blobs/uploads/", status: 405, code: "UNSUPPORTED"},
		{name: "delete", method: "DELETE", target: "/v2/a/blobs/" + testDigest, status: 405, code: "UNSUPPORTED"},
		{name: "not v2", method: "GET", target: "/v1/x", status: 404, code: "UNSUPPORTED"},
		{name: "catalog", method: "GET", target: "/v2/_catalog", status: 404, code: "UNSUPPORTED"},
		{name: "tags list", method: "GET", target: "/v2/a/tags/list", status: 404, code: "UNSUPPORTED"},
		{name: "dot dot", method: "GET", target: "/v2/../../etc/blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "dot dot component", method: "GET", target: "/v2/a/../b/blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "encoded slash", method: "GET", target: "/v2/a%2Fb/blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "encoded dots", method: "GET", target: "/v2/%2e%2e/blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "uppercase name", method: "GET", target: "/v2/Alpine/manifests/latest", status: 400, code: "NAME_INVALID"},
		{name: "empty name", method: "GET", target: "/v2//manifests/latest", status: 400, code: "NAME_INVALID"},
		// A malformed tag names no manifest: 404, as for any unknown manifest.
		{name: "bad tag", method: "GET", target: "/v2/a/manifests/-bad", status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "tag starting with a dot", method: "HEAD", target: "/v2/a/manifests/.INVALID_MANIFEST_NAME", status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "tag too long", method: "GET", target: "/v2/a/manifests/" + strings.Repeat("t", 129), status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "empty tag", method: "GET", target: "/v2/a/manifests/", status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "bad tag, bad name", method: "GET", target: "/v2/A/manifests/-bad", status: 400, code: "NAME_INVALID"},
		{name: "bad manifest digest", method: "GET", target: "/v2/a/manifests/sha256:totallywrong", status: 400, code: "DIGEST_INVALID"},
		{name: "blob by tag", method: "GET", target: "/v2/a/blobs/latest", status: 400, code: "DIGEST_INVALID"},
		{name: "short digest", method: "GET", target: "/v2/a/blobs/sha256:abc", status: 400, code: "DIGEST_INVALID"},
		{name: "uppercase digest", method: "GET", target: "/v2/a/blobs/sha256:" + strings.Repeat("AB", 32), status: 400, code: "DIGEST_INVALID"},
		{name: "sha512", method: "GET", target: "/v2/a/blobs/sha512:" + strings.Repeat("ab", 64), status: 400, code: "UNSUPPORTED"},
		{name: "digest with path", method: "GET", target: "/v2/a/blobs/sha256:../../x", status: 400, code: "DIGEST_INVALID"},
		{name: "absurd length", method: "GET", target: "/v2/" + strings.Repeat("a/", 600) + "blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "long name", method: "GET", target: "/v2/" + strings.Repeat("a", 256) + "/blobs/" + testDigest, status: 400, code: "NAME_INVALID"},
		{name: "bad ns", method: "GET", target: "/v2/a/blobs/" + testDigest + "?ns=evil/../x", status: 400, code: "NAME_INVALID"},
		{name: "ns with scheme", method: "GET", target: "/v2/a/blobs/" + testDigest + "?ns=http://x", status: 400, code: "NAME_INVALID"},
		{name: "two ns", method: "GET", target: "/v2/a/blobs/" + testDigest + "?ns=a.io&ns=b.io", status: 400, code: "UNSUPPORTED"},
		{name: "bad query", method: "GET", target: "/v2/a/blobs/" + testDigest + "?ns=%zz", status: 400, code: "UNSUPPORTED"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, err := url.ParseRequestURI(tt.target)
			if err != nil {
				t.Fatalf("bad test target: %v", err)
			}
			got, err := ParseRequest(tt.method, u, "docker.io")
			if tt.status != 0 {
				var reqErr *requestError
				if !errors.As(err, &reqErr) {
					t.Fatalf("ParseRequest(%s %s) = %+v, %v; want status %d", tt.method, tt.target, got, err, tt.status)
				}
				if reqErr.status != tt.status || reqErr.code != tt.code {
					t.Fatalf("ParseRequest(%s %s) = %d %s (%v); want %d %s", tt.method, tt.target, reqErr.status, reqErr.code, err, tt.status, tt.code)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseRequest(%s %s) = %v", tt.method, tt.target, err)
			}
			want := tt.want
			if want.HasDigest {
				want.Digest = got.Digest
				if got.Digest.String() != tt.want.Reference {
					t.Errorf("digest = %s, want %s", got.Digest, tt.want.Reference)
				}
			}
			if *got != want {
				t.Errorf("ParseRequest(%s %s) = %+v, want %+v", tt.method, tt.target, *got, want)
			}
		})
	}
}

// FuzzParseRequest checks that whatever the path and query, an accepted request only carries
// names, references and registries that pass validation on their own: nothing unvalidated can
// reach the store or the upstream client.
func FuzzParseRequest(f *testing.F) {
	for _, seed := range []string{
		"/v2/", "/v2/library/alpine/manifests/latest?ns=docker.io", "/v2/a/blobs/" + testDigest,
		"/v2/a%2F../blobs/" + testDigest, "/v2/a/manifests/" + testDigest + "?ns=registry.test:5000",
		"/v2/../blobs/sha256:x", "/v2/a/blobs/sha512:" + strings.Repeat("ab", 64),
	} {
		f.Add(http.MethodGet, seed)
	}
	f.Fuzz(func(t *testing.T, method, target string) {
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return
		}
		req, err := ParseRequest(method, u, "docker.io")
		if err != nil {
			var reqErr *requestError
			if !errors.As(err, &reqErr) || reqErr.status < 400 || reqErr.status > 499 || reqErr.code == "" {
				t.Fatalf("ParseRequest(%q, %q) error %v is not a 4xx OCI error", method, target, err)
			}
			return
		}
		if method != http.MethodGet && method != http.MethodHead {
			t.Fatalf("accepted method %q", method)
		}
		if err := oci.ValidateRegistry(req.Registry); err != nil {
			t.Fatalf("accepted registry %q: %v", req.Registry, err)
		}
		if req.Kind == KindBase {
			return
		}
		if err := oci.ValidateRepository(req.Repository); err != nil {
			t.Fatalf("accepted repository %q: %v", req.Repository, err)
		}
		if strings.Contains(req.Repository, "..") || strings.Contains(req.Reference, "/") {
			t.Fatalf("accepted path trick: %+v", req)
		}
		if req.Kind == KindBlob && !req.HasDigest {
			t.Fatalf("blob request without digest: %+v", req)
		}
		if req.HasDigest && req.Digest.String() != req.Reference {
			t.Fatalf("digest %s does not match reference %q", req.Digest, req.Reference)
		}
	})
}
