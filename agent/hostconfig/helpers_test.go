package hostconfig

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
)

const testMirror = "http://127.0.0.1:5001"

// containerdHosts returns the hosts containerd 1.6.20 would try for registry, in order, read
// by containerd's own code from the hosts directory dir (as the CRI plugin does with
// config_path). A hosts.toml containerd fails to parse shows up as the registry's default
// endpoint alone, never as a list starting with the mirror.
func containerdHosts(t *testing.T, dir, registry string) []docker.RegistryHost {
	t.Helper()
	hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir: config.HostDirFromRoot(dir),
	})(registry)
	if err != nil {
		t.Fatalf("containerd's ConfigureHosts(%s): %v", registry, err)
	}
	return hosts
}

// hostList renders hosts as "scheme://host/path caps" for comparison.
func hostList(hosts []docker.RegistryHost) []string {
	out := make([]string, len(hosts))
	for i, h := range hosts {
		var caps []string
		for _, c := range []struct {
			flag docker.HostCapabilities
			name string
		}{{docker.HostCapabilityPull, "pull"}, {docker.HostCapabilityResolve, "resolve"}, {docker.HostCapabilityPush, "push"}} {
			if h.Capabilities.Has(c.flag) {
				caps = append(caps, c.name)
			}
		}
		out[i] = fmt.Sprintf("%s://%s%s %s", h.Scheme, h.Host, h.Path, strings.Join(caps, ","))
	}
	return out
}

func tlsConfigOf(t *testing.T, h docker.RegistryHost) (rootCAs bool, clientCerts int, skipVerify bool) {
	t.Helper()
	tr, ok := h.Client.Transport.(*http.Transport)
	if !ok || tr.TLSClientConfig == nil {
		t.Fatalf("host %s: no *http.Transport with TLS config", h.Host)
	}
	c := tr.TLSClientConfig
	return c.RootCAs != nil, len(c.Certificates), c.InsecureSkipVerify
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // WriteFile's mode is subject to the umask
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func assertMissing(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("%s should not exist (err=%v)", path, err)
	}
}

// listTree returns every path under dir, relative, for before/after comparisons.
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		out = append(out, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writeCertFiles writes a self-signed certificate as a CA (name.crt) and as a client pair
// (name.cert, name.key) into dir, so containerd can load them.
func writeCertFiles(t *testing.T, dir, name string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "shoal test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFile(t, filepath.Join(dir, name+".crt"), certPEM, 0o644)
	writeFile(t, filepath.Join(dir, name+".cert"), certPEM, 0o644)
	writeFile(t, filepath.Join(dir, name+".key"), string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})), 0o600)
}
