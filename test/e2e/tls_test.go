package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
)

// TestPrivateCARegistry: the registry serves HTTPS with a certificate of a CA the
// test made, which no system trusts; the node's hosts.toml for registry.test names it (`ca`).
// The agent takes that CA for the registry's endpoint, whether the endpoint comes from the
// hosts.toml's server or from --registry-endpoint, and the blobs reach containerd through the
// agent. For an endpoint the hosts.toml gives no CA, the agent's TLS handshake fails, it
// answers 502, and containerd pulls from the registry itself, with the CA; unless the agent
// trusts the CA for every registry (--registry-ca-file).
func TestPrivateCARegistry(t *testing.T) {
	harness.RequireIsolation(t)
	// Short names: containerd's socket paths, under the test's directory, must stay short.
	tests := []struct {
		name     string
		endpoint string // --registry-endpoint for registry.test, PORT replaced; "" = none
		caFlag   bool   // --registry-ca-file with the CA
		viaAgent bool
	}{
		{name: "server", viaAgent: true},                                              // the endpoint is the hosts.toml's server
		{name: "flag", endpoint: "https://127.0.0.1:PORT", viaAgent: true},            // the same endpoint, given with --registry-endpoint
		{name: "no-ca-fallback", endpoint: "https://localhost:PORT", viaAgent: false}, // an endpoint the hosts.toml gives no CA
		{name: "ca-file", endpoint: "https://localhost:PORT", caFlag: true, viaAgent: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			img := e.pushImage("test/tls:v1")
			// The harness pushes over plain HTTP: serve the same storage over HTTPS from now on.
			if err := e.reg.Close(); err != nil {
				t.Fatal(err)
			}
			caFile, certFile, keyFile := writeTestPKI(t, filepath.Join(e.dir, "pki"))
			reg, err := harness.StartRegistry(e.ctx, filepath.Join(e.dir, "registry"),
				harness.WithLogger(e.logger), harness.WithTLS(certFile, keyFile))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.closeOrLog("TLS registry", reg.Close) })
			e.reg = reg
			_, port, _ := net.SplitHostPort(reg.Host())

			// The user's file, as the node had it before Shoal; the agent merges its mirror in.
			user := fmt.Sprintf("server = %q\nca = %q\n", reg.URL(), caFile)
			hostsDir := filepath.Join(e.hostsDir, registryName)
			if err := os.MkdirAll(hostsDir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(hostsDir, "hosts.toml"), []byte(user), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := e.agentConfig()
			cfg.RegistryEndpoints = nil
			if tt.endpoint != "" {
				cfg.RegistryEndpoints = map[string]string{registryName: strings.ReplaceAll(tt.endpoint, "PORT", port)}
			}
			if tt.caFlag {
				cfg.ExtraArgs = append(cfg.ExtraArgs, "--registry-ca-file", caFile)
			}
			agent := e.startAgent(cfg)

			ctd := e.startContainerd("containerd")
			e.pull(ctd, img.Name(registryName))

			direct, viaAgent := e.blobGETs()
			m := e.metrics(agent)
			if tt.viaAgent {
				for _, b := range img.Blobs() {
					if viaAgent[b] != 1 || direct[b] != 0 {
						t.Errorf("blob %s: %d GETs by the agent and %d by containerd, want 1 and 0", b, viaAgent[b], direct[b])
					}
				}
				if got := m.Value(mirrorRequests, blobFromUpstream); got < float64(len(img.Blobs())) {
					t.Errorf("%s = %v, want >= %d", series(mirrorRequests, blobFromUpstream), got, len(img.Blobs()))
				}
				return
			}
			for _, b := range img.Blobs() {
				if direct[b] != 1 || viaAgent[b] != 0 {
					t.Errorf("blob %s: %d GETs by containerd and %d by the agent, want 1 and 0", b, direct[b], viaAgent[b])
				}
			}
			failed := map[string]string{"result": "error"}
			if got := m.Value(mirrorRequests, failed); got == 0 {
				t.Errorf("%s = 0: the agent did not refuse a single request", series(mirrorRequests, failed))
			}
			if got := m.Value(mirrorRequests, blobFromUpstream); got != 0 {
				t.Errorf("%s = %v, want 0", series(mirrorRequests, blobFromUpstream), got)
			}
			log, err := os.ReadFile(agent.LogPath())
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(log), `"status":502`) || !strings.Contains(string(log), "certificate signed by unknown authority") {
				t.Errorf("the agent log shows no 502 for an untrusted certificate:\n%s", tail(agent.LogPath(), 20))
			}
		})
	}
}

// writeTestPKI writes a CA (ca.pem) and a registry certificate it signed for 127.0.0.1 and
// localhost (registry.pem, registry-key.pem) into dir, and returns their paths.
func writeTestPKI(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	newKey := func() *ecdsa.PrivateKey {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}
	caKey, key := newKey(), newKey()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "shoal e2e CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "registry"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, blockType string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("registry.pem", "CERTIFICATE", der), write("registry-key.pem", "EC PRIVATE KEY", keyDER)
}
