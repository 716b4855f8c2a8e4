package resolve

import (
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

const someDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParseReferenceNormalises(t *testing.T) {
	tests := []struct {
		in, want, tag string
	}{
		{"nginx", "index.docker.io/library/nginx:latest", "latest"},
		{"docker.io/nginx:1.27", "index.docker.io/library/nginx:1.27", "1.27"},
		{"docker.io/library/nginx@" + someDigest, "index.docker.io/library/nginx@" + someDigest, ""},
		{"team/app:1", "index.docker.io/team/app:1", "1"},
		{"registry.test/team/app:1.4", "registry.test/team/app:1.4", "1.4"},
		{"registry.test:5000/app", "registry.test:5000/app:latest", "latest"},
		{"localhost/app:1", "localhost/app:1", "1"},
		{"[::1]:5000/app:1", "[::1]:5000/app:1", "1"},
		{"registry.test/app:1.4@" + someDigest, "registry.test/app@" + someDigest, "1.4"},
	}
	for _, tt := range tests {
		ref, err := ParseReference(tt.in)
		if err != nil {
			t.Errorf("ParseReference(%q): %v", tt.in, err)
			continue
		}
		if ref.Name() != tt.want {
			t.Errorf("ParseReference(%q).Name() = %q, want %q", tt.in, ref.Name(), tt.want)
		}
		if got := writtenTag(tt.in, ref); got != tt.tag {
			t.Errorf("tag of %q = %q, want %q", tt.in, got, tt.tag)
		}
	}
}

func TestNormalizePlatform(t *testing.T) {
	tests := []struct {
		in   v1.Platform
		want string
	}{
		{v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, "linux/arm64"},
		{v1.Platform{OS: "linux", Architecture: "aarch64"}, "linux/arm64"},
		{v1.Platform{OS: "linux", Architecture: "arm"}, "linux/arm/v7"},
		{v1.Platform{OS: "linux", Architecture: "armhf"}, "linux/arm/v7"},
		{v1.Platform{OS: "linux", Architecture: "arm", Variant: "6"}, "linux/arm/v6"},
		{v1.Platform{OS: "linux", Architecture: "x86_64"}, "linux/amd64"},
		{v1.Platform{OS: "linux", Architecture: "amd64", Variant: "v3"}, "linux/amd64/v3"},
		{v1.Platform{OS: "windows", Architecture: "amd64", OSVersion: "10.0.20348.2227"}, "windows/amd64"},
	}
	for _, tt := range tests {
		if got := platformString(normalizePlatform(tt.in)); got != tt.want {
			t.Errorf("normalizePlatform(%+v) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// FuzzParseReference: parsing never panics, and the canonical form of anything accepted parses
// to itself (normalisation is idempotent) and is accepted by the strict checks again.
func FuzzParseReference(f *testing.F) {
	for _, seed := range []string{
		"nginx", "docker.io/nginx", "registry.test/team/app:1.4", "registry.test/app@" + someDigest,
		"registry.test/app:1.4@" + someDigest, "[::1]:5000/app", "localhost:5000/a/b/c:t",
		"registry.test/App", "a//b", "a:b:c", "@", ":", "a@sha256:", "http://x/y", "index.docker.io/x",
		"registry-1.docker.io/library/x", "x/" + strings.Repeat("a", 300),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, err := ParseReference(s)
		if err != nil {
			if !strings.Contains(err.Error(), "not a reference") {
				t.Fatalf("error %q does not say it is not a reference", err)
			}
			return
		}
		canonical := ref.Name()
		again, err := ParseReference(canonical)
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", canonical, s, err)
		}
		if again.Name() != canonical {
			t.Fatalf("canonical form %q of %q parses to %q", canonical, s, again.Name())
		}
		if again.Context().Name() != ref.Context().Name() {
			t.Fatalf("repository %q of %q becomes %q", ref.Context().Name(), s, again.Context().Name())
		}
		_ = writtenTag(s, ref)
	})
}
