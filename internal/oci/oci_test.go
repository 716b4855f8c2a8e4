package oci

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateRepository(t *testing.T) {
	valid := []string{"alpine", "library/alpine", "a/b/c", "my-org/my_app", "a__b", "a.b-c", "x0/y1"}
	invalid := []string{"", "Alpine", "../etc", "a/../b", "a//b", "/a", "a/", "a/.", "-a", "a-", "a%2Fb", "a b",
		"a\\b", "a..b", strings.Repeat("a", 256), "a/./b", "a\x00b"}
	for _, name := range valid {
		if err := ValidateRepository(name); err != nil {
			t.Errorf("ValidateRepository(%q) = %v, want nil", name, err)
		}
	}
	for _, name := range invalid {
		if err := ValidateRepository(name); !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidateRepository(%q) = %v, want ErrInvalidName", name, err)
		}
	}
}

func TestValidateTag(t *testing.T) {
	for _, tag := range []string{"latest", "v1.2.3", "_x", "A-b_c.d", strings.Repeat("a", 128)} {
		if err := ValidateTag(tag); err != nil {
			t.Errorf("ValidateTag(%q) = %v", tag, err)
		}
	}
	for _, tag := range []string{"", ".x", "-x", "a/b", "a:b", "..", strings.Repeat("a", 129), "a b"} {
		if err := ValidateTag(tag); !errors.Is(err, ErrInvalidReference) {
			t.Errorf("ValidateTag(%q) = %v, want ErrInvalidReference", tag, err)
		}
	}
}

func TestParseDigest(t *testing.T) {
	good := "sha256:" + strings.Repeat("ab", 32)
	h, err := ParseDigest(good)
	if err != nil || h.String() != good {
		t.Fatalf("ParseDigest(%q) = %v, %v", good, h, err)
	}
	tests := []struct {
		in   string
		want error
	}{
		{"sha512:" + strings.Repeat("ab", 64), ErrUnsupportedDigest},
		{"md5:abcd", ErrUnsupportedDigest},
		{"sha256:" + strings.Repeat("AB", 32), ErrInvalidReference},
		{"sha256:" + strings.Repeat("ab", 31), ErrInvalidReference},
		{"sha256:" + strings.Repeat("ab", 33), ErrInvalidReference},
		{"sha256:../../etc/passwd", ErrInvalidReference},
		{"sha256", ErrInvalidReference},
		{":abc", ErrInvalidReference},
		{"", ErrInvalidReference},
		{"sha256:" + strings.Repeat("a", 5000), ErrInvalidReference},
	}
	for _, tt := range tests {
		if _, err := ParseDigest(tt.in); !errors.Is(err, tt.want) {
			t.Errorf("ParseDigest(%.40q) = %v, want %v", tt.in, err, tt.want)
		}
	}
}

func TestValidateRegistry(t *testing.T) {
	for _, r := range []string{"docker.io", "registry.test", "registry.test:5000", "localhost", "127.0.0.1:5000", "[::1]:5000", "[::1]", "ghcr.io"} {
		if err := ValidateRegistry(r); err != nil {
			t.Errorf("ValidateRegistry(%q) = %v", r, err)
		}
	}
	for _, r := range []string{"", "docker.io/library", "http://x", "a..b", "../x", "x:0", "x:65536", "x:01", "x:", "x y",
		"[1.2.3.4]:80", "[::1", "[::1]x", "[fe80::1%eth0]:80", "-a.b", "a.b/../c", "a@b", strings.Repeat("a", 300)} {
		if err := ValidateRegistry(r); !errors.Is(err, ErrInvalidRegistry) {
			t.Errorf("ValidateRegistry(%q) = %v, want ErrInvalidRegistry", r, err)
		}
	}
}

func TestManifestMediaType(t *testing.T) {
	tests := map[string]string{
		`{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}`: MediaTypeDockerManifest,
		`{"schemaVersion":2,"manifests":[]}`:                                   MediaTypeOCIIndex,
		`{"schemaVersion":2,"config":{},"layers":[]}`:                          MediaTypeOCIManifest,
		`{"schemaVersion":2}`:                                                  "",
		`not json`:                                                             "",
	}
	for body, want := range tests {
		if got := ManifestMediaType([]byte(body)); got != want {
			t.Errorf("ManifestMediaType(%s) = %q, want %q", body, got, want)
		}
	}
}

func FuzzParseDigest(f *testing.F) {
	f.Add("sha256:" + strings.Repeat("ab", 32))
	f.Add("sha512:" + strings.Repeat("ab", 64))
	f.Add("sha256:../../x")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseDigest(s)
		if err != nil {
			return
		}
		if h.String() != s || h.Algorithm != "sha256" || len(h.Hex) != 64 || strings.ContainsAny(h.Hex, "/.") {
			t.Fatalf("ParseDigest(%q) accepted %v", s, h)
		}
	})
}

func TestMirrorRegistry(t *testing.T) {
	for host, want := range map[string]string{
		"index.docker.io":      "docker.io",
		"registry-1.docker.io": "docker.io",
		"docker.io":            "docker.io",
		"registry.test:5000":   "registry.test:5000",
	} {
		if got := MirrorRegistry(host); got != want {
			t.Errorf("MirrorRegistry(%q) = %q, want %q", host, got, want)
		}
	}
}

func TestValidateURLHost(t *testing.T) {
	for _, ok := range []string{"registry.test:5000", "[::1]:5000", "[fe80::1%eth0]:5000"} {
		if err := ValidateURLHost(ok); err != nil {
			t.Errorf("ValidateURLHost(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"[::%\x86]", "host name", "host\tx", "höst"} {
		if err := ValidateURLHost(bad); err == nil {
			t.Errorf("ValidateURLHost(%q): no error", bad)
		}
	}
}
