package upstream_test

import (
	"strings"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
)

func TestParseEndpoint(t *testing.T) {
	good := map[string]upstream.Endpoint{
		"http://127.0.0.1:5000":           {Scheme: "http", Host: "127.0.0.1:5000"},
		"https://registry-1.docker.io":    {Scheme: "https", Host: "registry-1.docker.io"},
		"https://registry-1.docker.io/v2": {Scheme: "https", Host: "registry-1.docker.io"},
		"http://[::1]:5000/":              {Scheme: "http", Host: "[::1]:5000"},
		"registry.test:5000":              {Scheme: "https", Host: "registry.test:5000"},
	}
	for in, want := range good {
		got, err := upstream.ParseEndpoint(in)
		if err != nil || got != want {
			t.Errorf("ParseEndpoint(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "ftp://registry.test", "http://", "https://user:pw@registry.test", "https://registry.test/other",
		"https://registry.test/v2?x=1", "https://registry.test/#frag", "http://:5000", "[::%25\x86]",
	} {
		if got, err := upstream.ParseEndpoint(in); err == nil {
			t.Errorf("ParseEndpoint(%q) = %+v, want an error", in, got)
		}
	}
}

func TestDefaultEndpoint(t *testing.T) {
	for registry, want := range map[string]string{
		"docker.io":          "https://registry-1.docker.io",
		"index.docker.io":    "https://registry-1.docker.io",
		"ghcr.io":            "https://ghcr.io",
		"registry.test:5000": "https://registry.test:5000",
	} {
		if got := upstream.DefaultEndpoint(registry).String(); got != want {
			t.Errorf("DefaultEndpoint(%q) = %s, want %s", registry, got, want)
		}
	}
}

// FuzzParseEndpoint checks that an accepted --registry-endpoint or hosts.toml server is a bare
// http or https origin (nothing but the Distribution API paths is ever requested from it), and
// that its String form parses back to it.
func FuzzParseEndpoint(f *testing.F) {
	for _, s := range []string{
		"http://127.0.0.1:5000", "registry.test", "https://registry.test/v2/", "https://u:p@h",
		"https://h/x", "https://h?q", "ftp://h", "https://[::1]:5000", "https://:80", "//h",
		"https://[fe80::1%25eth0]:5000",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := upstream.ParseEndpoint(s)
		if err != nil {
			return
		}
		if (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" || strings.ContainsAny(e.Host, "/?#@ ") {
			t.Fatalf("ParseEndpoint(%q) = %+v: not a bare http(s) origin", s, e)
		}
		again, err := upstream.ParseEndpoint(e.String())
		if err != nil || again != e {
			t.Fatalf("ParseEndpoint(%q) = %+v, whose String parses as %+v, %v", s, e, again, err)
		}
	})
}
