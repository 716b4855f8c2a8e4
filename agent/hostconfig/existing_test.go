package hostconfig

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestExistingTLS(t *testing.T) {
	const userFile = `server = "https://upstream.test"
ca = "ca.pem"
client = [["client.cert", "client.key"]]

[host."https://mirror.corp.test/v2"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/corp/a.pem", "b.pem"]
  client = "both.pem"
  skip_verify = true

[host."https://upstream.test"]
  ca = "host.pem"
`
	tests := []struct {
		name     string
		files    map[string]string // relative path → content
		shoal    []string          // registries Shoal writes before the lookup
		registry string
		endpoint string
		want     TLS // paths relative to the hosts directory are made absolute below
		wantErr  string
	}{
		{
			name:     "nothing configured",
			registry: "registry.test", endpoint: "https://registry.test",
		},
		{
			name:     "user file: a [host] table before the server with the same URL",
			files:    map[string]string{"registry.test/hosts.toml": userFile},
			registry: "registry.test", endpoint: "https://upstream.test",
			want: TLS{CA: []string{"registry.test/host.pem"}, Source: "registry.test/hosts.toml"},
		},
		{
			name:     "user file: another host, its path ignored",
			files:    map[string]string{"registry.test/hosts.toml": userFile},
			registry: "registry.test", endpoint: "https://mirror.corp.test",
			want: TLS{CA: []string{"/etc/corp/a.pem", "registry.test/b.pem"}, Client: [][2]string{{"registry.test/both.pem", ""}},
				SkipVerify: true, Source: "registry.test/hosts.toml"},
		},
		{
			name:     "merged file: the user's settings, from the backup",
			files:    map[string]string{"registry.test/hosts.toml": userFile},
			shoal:    []string{"registry.test"},
			registry: "registry.test", endpoint: "https://mirror.corp.test:443",
			want: TLS{CA: []string{"/etc/corp/a.pem", "registry.test/b.pem"}, Client: [][2]string{{"registry.test/both.pem", ""}},
				SkipVerify: true, Source: "registry.test/hosts.toml.shoal-backup"},
		},
		{
			name:     "merged file: Shoal's mirror is not one of the user's hosts",
			files:    map[string]string{"registry.test/hosts.toml": userFile},
			shoal:    []string{"registry.test"},
			registry: "registry.test", endpoint: testMirror,
		},
		{
			name:     "top-level settings belong to the server",
			files:    map[string]string{"registry.test/hosts.toml": "server = \"https://Upstream.test:8443\"\nca = \"ca.pem\"\nclient = [[\"c.cert\", \"c.key\"], [\"both.pem\", \"\"], \"one.pem\"]\n"},
			registry: "registry.test", endpoint: "https://upstream.test:8443",
			want: TLS{CA: []string{"registry.test/ca.pem"},
				Client: [][2]string{{"registry.test/c.cert", "registry.test/c.key"}, {"registry.test/both.pem", ""}, {"registry.test/one.pem", ""}},
				Source: "registry.test/hosts.toml"},
		},
		{
			name:     "a server without scheme is https",
			files:    map[string]string{"registry.test/hosts.toml": "server = \"upstream.test:5000\"\nskip_verify = true\n"},
			registry: "registry.test", endpoint: "https://upstream.test:5000",
			want: TLS{SkipVerify: true, Source: "registry.test/hosts.toml"},
		},
		{
			name:     "another scheme is another host",
			files:    map[string]string{"registry.test/hosts.toml": "server = \"https://upstream.test\"\nca = \"ca.pem\"\n"},
			registry: "registry.test", endpoint: "http://upstream.test",
		},
		{
			name:     "an endpoint the file does not list gets nothing",
			files:    map[string]string{"registry.test/hosts.toml": userFile},
			registry: "registry.test", endpoint: "https://elsewhere.test",
		},
		{
			name:     "without server, the top-level settings are the registry's default endpoint's",
			files:    map[string]string{"registry.test/hosts.toml": "ca = \"ca.pem\"\n"},
			registry: "registry.test", endpoint: "https://registry.test",
			want: TLS{CA: []string{"registry.test/ca.pem"}, Source: "registry.test/hosts.toml"},
		},
		{
			name:     "user catch-all, seen through Shoal's own directory",
			files:    map[string]string{"_default/hosts.toml": "ca = \"corp.pem\"\n"},
			shoal:    []string{"registry.test"},
			registry: "registry.test", endpoint: "https://registry.test",
			want: TLS{CA: []string{"_default/corp.pem"}, Source: "_default/hosts.toml"},
		},
		{
			name:     "docker.io's default endpoint",
			files:    map[string]string{"_default/hosts.toml": "ca = \"corp.pem\"\n"},
			registry: "docker.io", endpoint: "https://registry-1.docker.io",
			want: TLS{CA: []string{"_default/corp.pem"}, Source: "_default/hosts.toml"},
		},
		{
			name:     "a directory with certificate files only, before Shoal",
			files:    map[string]string{"registry.test/ca.crt": "x", "registry.test/client.cert": "x", "registry.test/client.key": "x", "registry.test/both.cert": "x"},
			registry: "registry.test", endpoint: "https://registry.test",
			want: TLS{CA: []string{"registry.test/ca.crt"},
				Client: [][2]string{{"registry.test/both.cert", "registry.test/both.cert"}, {"registry.test/client.cert", "registry.test/client.key"}},
				Source: "registry.test"},
		},
		{
			name:     "a directory with certificate files only, after Shoal",
			files:    map[string]string{"registry.test/ca.crt": "x"},
			shoal:    []string{"registry.test"},
			registry: "registry.test", endpoint: "https://registry.test",
			want: TLS{CA: []string{"registry.test/ca.crt"}, Source: "registry.test"},
		},
		{
			name:     "ca of the wrong type",
			files:    map[string]string{"registry.test/hosts.toml": "ca = 1\n"},
			registry: "registry.test", endpoint: "https://registry.test",
			wantErr: "ca is a int64",
		},
		{
			name:     "client pair of one",
			files:    map[string]string{"registry.test/hosts.toml": "[host.\"https://a.test\"]\n  client = [[\"c.cert\"]]\n"},
			registry: "registry.test", endpoint: "https://a.test",
			wantErr: `[host."https://a.test"]: client`,
		},
		{
			name:     "client of the wrong type",
			files:    map[string]string{"registry.test/hosts.toml": "client = [1]\n"},
			registry: "registry.test", endpoint: "https://registry.test",
			wantErr: "client: 1 is neither a path nor a [certificate, key] pair",
		},
		{
			name:     "invalid TOML",
			files:    map[string]string{"registry.test/hosts.toml": "ca = \n"},
			registry: "registry.test", endpoint: "https://registry.test",
			wantErr: "parse",
		},
		{name: "path trick", registry: "../x", endpoint: "https://x", wantErr: "invalid registry name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for rel, content := range tt.files {
				writeFile(t, filepath.Join(dir, rel), content, 0o644)
			}
			if tt.shoal != nil {
				if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: tt.shoal}); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ExistingTLS(dir, tt.registry, tt.endpoint)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ExistingTLS = %+v, %v; want an error with %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := absTLS(dir, tt.want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("ExistingTLS(%s, %s) =\n  %+v\nwant\n  %+v", tt.registry, tt.endpoint, got, want)
			}
			if got.Empty() != (len(want.CA) == 0 && len(want.Client) == 0 && !want.SkipVerify) {
				t.Errorf("Empty() = %v for %+v", got.Empty(), got)
			}
		})
	}
}

// absTLS makes the relative paths of a wanted result absolute under dir.
func absTLS(dir string, t TLS) TLS {
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	for i := range t.CA {
		t.CA[i] = abs(t.CA[i])
	}
	for i := range t.Client {
		t.Client[i] = [2]string{abs(t.Client[i][0]), abs(t.Client[i][1])}
	}
	if t.Source != "" {
		t.Source = abs(t.Source)
	}
	return t
}

// TestExistingTLSAgreesWithContainerd: for every host containerd 1.6.20 reads from a merged
// file (the mirror aside), ExistingTLS gives the settings containerd's own code builds its TLS
// configuration from: the same roots, client certificates and skip_verify.
func TestExistingTLSAgreesWithContainerd(t *testing.T) {
	dir := t.TempDir()
	regDir := filepath.Join(dir, "registry.test")
	for _, name := range []string{"a", "b", "c", "d"} {
		writeCertFiles(t, regDir, name)
	}
	abs := filepath.Join(regDir, "d.crt")
	user := `server = "https://upstream.test:5000"
ca = "a.crt"
client = [["a.cert", "a.key"]]

[host."https://one.test"]
  capabilities = ["pull", "resolve"]
  ca = ["b.crt", "` + abs + `"]
  client = ["b.cert", "c.cert"]

[host."https://two.test:8443/v2"]
  skip_verify = true
  client = [["c.cert", "c.key"], ["d.cert", "d.key"]]

[host."http://three.test"]
`
	// c.cert holds no key: containerd takes the key from the certificate file, so make it so.
	writeFile(t, filepath.Join(regDir, "c.cert"), readFile(t, filepath.Join(regDir, "c.cert"))+readFile(t, filepath.Join(regDir, "c.key")), 0o644)
	writeFile(t, filepath.Join(regDir, "b.cert"), readFile(t, filepath.Join(regDir, "b.cert"))+readFile(t, filepath.Join(regDir, "b.key")), 0o644)
	writeFile(t, filepath.Join(regDir, "hosts.toml"), user, 0o644)
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}); err != nil {
		t.Fatal(err)
	}

	hosts := containerdHosts(t, dir, "registry.test")
	if got := hostList(hosts); len(got) != 5 || !strings.HasPrefix(got[0], testMirror) {
		t.Fatalf("containerd reads hosts %q, want the mirror and the user's four", got)
	}
	for _, h := range hosts[1:] {
		endpoint := h.Scheme + "://" + h.Host
		t.Run(endpoint, func(t *testing.T) {
			ours, err := ExistingTLS(dir, "registry.test", endpoint)
			if err != nil {
				t.Fatal(err)
			}
			tr, ok := h.Client.Transport.(*http.Transport)
			if !ok {
				t.Fatalf("containerd's transport is a %T", h.Client.Transport)
			}
			theirs := tr.TLSClientConfig
			if theirs == nil {
				theirs = &tls.Config{}
			}
			if ours.SkipVerify != theirs.InsecureSkipVerify {
				t.Errorf("skip_verify: ours %v, containerd's %v", ours.SkipVerify, theirs.InsecureSkipVerify)
			}
			switch {
			case len(ours.CA) == 0 && theirs.RootCAs != nil:
				t.Errorf("no CA files, but containerd has roots of its own")
			case len(ours.CA) > 0:
				pool, err := x509.SystemCertPool()
				if err != nil {
					t.Fatal(err)
				}
				for _, f := range ours.CA {
					b, err := os.ReadFile(f)
					if err != nil || !pool.AppendCertsFromPEM(b) {
						t.Fatalf("CA file %s: %v", f, err)
					}
				}
				if theirs.RootCAs == nil || !pool.Equal(theirs.RootCAs) {
					t.Errorf("the roots of CA files %q differ from containerd's", ours.CA)
				}
			}
			if len(ours.Client) != len(theirs.Certificates) {
				t.Fatalf("%d client certificates, containerd has %d", len(ours.Client), len(theirs.Certificates))
			}
			for i, pair := range ours.Client {
				key := pair[1]
				if key == "" {
					key = pair[0]
				}
				cert, err := tls.LoadX509KeyPair(pair[0], key)
				if err != nil {
					t.Fatalf("client certificate %q: %v", pair, err)
				}
				if string(cert.Certificate[0]) != string(theirs.Certificates[i].Certificate[0]) {
					t.Errorf("client certificate %d (%q) differs from containerd's", i, pair)
				}
			}
		})
	}
}

// TestExistingMirrors finds the hosts of the node's own file other than the registry's server,
// also once Shoal merged into the file, and none in a file that lists only the server.
func TestExistingMirrors(t *testing.T) {
	dir := t.TempDir()
	write := func(registry, content string) {
		if err := os.MkdirAll(filepath.Join(dir, registry), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, registry, "hosts.toml"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("docker.io", "server = \"https://registry-1.docker.io\"\n\n[host.\"https://10.0.0.5:6443/v2\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n\n[host.\"https://registry-1.docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
	write("registry.test", "server = \"http://10.99.0.1:5000\"\n\n[host.\"http://10.99.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
	for registry, want := range map[string][]string{"docker.io": {"https://10.0.0.5:6443/v2"}, "registry.test": nil, "ghcr.io": nil} {
		got, err := ExistingMirrors(dir, registry)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ExistingMirrors(%s) = %v, %v; want %v", registry, got, err, want)
		}
	}
	// Shoal merged in front: the mirror found is still the user's, never Shoal's own.
	if err := Write(Config{Dir: dir, MirrorURL: "http://127.0.0.1:5001", Registries: []string{"docker.io"}}); err != nil {
		t.Fatal(err)
	}
	if got, err := ExistingMirrors(dir, "docker.io"); err != nil || !slices.Equal(got, []string{"https://10.0.0.5:6443/v2"}) {
		t.Errorf("after Shoal's merge: %v, %v", got, err)
	}
}
