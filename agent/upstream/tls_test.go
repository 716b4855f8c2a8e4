package upstream_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// issue returns a certificate and key (PEM) signed by the CA: for a server on 127.0.0.1 and
// localhost, or for a client named cn.
func (ca *testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key := newKey(t)
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}

// tlsRegistry is go-containerregistry's in-memory registry served over HTTPS with a certificate
// of the test's CA (and over plain HTTP for pushing test images into it).
type tlsRegistry struct {
	endpoint  upstream.Endpoint
	plainHost string
	conns     atomic.Int64 // TLS connections accepted

	mu      sync.Mutex
	clients []string // common names of the client certificates of requests, "" for none
}

// startTLSRegistry starts the registry; with clientCA, it demands a client certificate signed
// by clientCA (tls.RequireAndVerifyClientCert).
func startTLSRegistry(t *testing.T, ca, clientCA *testCA) *tlsRegistry {
	t.Helper()
	r := &tlsRegistry{}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	plain := httptest.NewServer(h)
	t.Cleanup(plain.Close)
	r.plainHost = strings.TrimPrefix(plain.URL, "http://")

	certPEM, keyPEM := ca.issue(t, "registry", true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		cn := ""
		if len(req.TLS.PeerCertificates) > 0 {
			cn = req.TLS.PeerCertificates[0].Subject.CommonName
		}
		r.mu.Lock()
		r.clients = append(r.clients, cn)
		r.mu.Unlock()
		h.ServeHTTP(w, req)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	if clientCA != nil {
		pool := x509.NewCertPool()
		pool.AddCert(clientCA.cert)
		srv.TLS.ClientAuth, srv.TLS.ClientCAs = tls.RequireAndVerifyClientCert, pool
	}
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			r.conns.Add(1)
		}
	}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // failed handshakes are what some tests want
	srv.StartTLS()
	t.Cleanup(srv.Close)
	r.endpoint = upstream.Endpoint{Scheme: "https", Host: strings.TrimPrefix(srv.URL, "https://")}
	return r
}

func (r *tlsRegistry) clientNames() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.clients...)
}

// tlsClient returns a client that finds every registry at r's endpoint, with the TLS settings
// settings(registry) gives.
func (r *tlsRegistry) client(settings func(registry string) upstream.TLSSettings, opts ...upstream.Option) *upstream.Client {
	return upstream.New(append([]upstream.Option{
		upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) { return r.endpoint, nil }),
		upstream.WithTLSResolver(func(registry string, endpoint upstream.Endpoint) (upstream.TLSSettings, error) {
			if endpoint != r.endpoint {
				return upstream.TLSSettings{}, errors.New("asked for the settings of another endpoint")
			}
			return settings(registry), nil
		}),
		upstream.WithAuthCacheTTL(0), // every request authenticates: the handshake is tested too
	}, opts...)...)
}

func writeTestFile(t *testing.T, dir, name string, content []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// pull fetches the image's manifest and first layer through c, and returns the first error.
func pull(t *testing.T, c *upstream.Client, registry string, img pushed, layer []byte) error {
	t.Helper()
	ctx := testContext(t)
	m, err := c.Manifest(ctx, registry, img.repo, img.tag, nil)
	if err != nil {
		return err
	}
	if m.Digest != img.digest {
		t.Errorf("manifest %s, want %s", m.Digest, img.digest)
	}
	body, _, err := c.Blob(ctx, registry, img.repo, mustDigest(t, layer), 0, -1)
	if err != nil {
		return err
	}
	defer body.Close()
	got, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	if string(got) != string(layer) {
		t.Errorf("blob differs from the pushed layer")
	}
	return nil
}

// wantTLSFailure checks that err is an upstream failure on which the mirror sends the runtime
// on to its next host, and that it says it was about a certificate.
func wantTLSFailure(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		t.Fatal("the pull succeeded, want a TLS failure")
	}
	var uerr *upstream.Error
	if !errors.As(err, &uerr) || !errors.Is(err, upstream.ErrUnavailable) {
		t.Errorf("error %v (%T) is not an *upstream.Error of kind ErrUnavailable, which the mirror answers with 502", err, err)
	}
	if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("error %q does not mention the certificate", err)
	}
}

func TestPrivateCA(t *testing.T) {
	ca := newTestCA(t, "shoal test CA")
	other := newTestCA(t, "another CA")
	reg := startTLSRegistry(t, ca, nil)
	img, image := pushImage(t, reg.plainHost, "test/app", "v1", 1)
	layer, _ := layerBytes(t, image)
	dir := t.TempDir()
	caFile := writeTestFile(t, dir, "ca.pem", ca.pem)
	otherFile := writeTestFile(t, dir, "other.pem", other.pem)
	bundle := writeTestFile(t, dir, "bundle.pem", append(append([]byte("# a bundle\n"), other.pem...), ca.pem...))
	roots, err := upstream.ReadCAFile(bundle)
	if err != nil || len(roots) != 2 {
		t.Fatalf("ReadCAFile(bundle) = %d certificates, %v; want 2", len(roots), err)
	}

	tests := []struct {
		name     string
		settings upstream.TLSSettings
		opts     []upstream.Option
		ok       bool
	}{
		{name: "system roots only", ok: false},
		{name: "ca of another CA", settings: upstream.TLSSettings{CAFiles: []string{otherFile}}, ok: false},
		{name: "ca", settings: upstream.TLSSettings{CAFiles: []string{caFile}}, ok: true},
		{name: "ca among several files", settings: upstream.TLSSettings{CAFiles: []string{otherFile, caFile}}, ok: true},
		{name: "root CAs for every registry", opts: []upstream.Option{upstream.WithRootCAs(roots...)}, ok: true},
		{name: "skip_verify", settings: upstream.TLSSettings{SkipVerify: true}, ok: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := reg.client(func(string) upstream.TLSSettings { return tt.settings }, tt.opts...)
			err := pull(t, c, "registry.test", img, layer)
			if tt.ok && err != nil {
				t.Fatalf("pull: %v", err)
			}
			if !tt.ok {
				wantTLSFailure(t, err)
			}
		})
	}
}

func TestClientCertificate(t *testing.T) {
	ca := newTestCA(t, "shoal test CA")
	clientCA := newTestCA(t, "client CA")
	stranger := newTestCA(t, "stranger CA")
	reg := startTLSRegistry(t, ca, clientCA)
	img, image := pushImage(t, reg.plainHost, "test/app", "v1", 1)
	layer, _ := layerBytes(t, image)

	dir := t.TempDir()
	caFile := writeTestFile(t, dir, "ca.pem", ca.pem)
	cert, key := clientCA.issue(t, "node-1", false)
	certFile := writeTestFile(t, dir, "client.cert", cert)
	keyFile := writeTestFile(t, dir, "client.key", key)
	bothFile := writeTestFile(t, dir, "client.pem", append(append([]byte{}, cert...), key...))
	strangerCert, strangerKey := stranger.issue(t, "stranger", false)
	strangerCertFile := writeTestFile(t, dir, "stranger.cert", strangerCert)
	strangerKeyFile := writeTestFile(t, dir, "stranger.key", strangerKey)

	tests := []struct {
		name    string
		clients []upstream.ClientCert
		ok      bool
	}{
		{name: "no client certificate", ok: false},
		{name: "certificate of a CA the registry does not accept", clients: []upstream.ClientCert{{CertFile: strangerCertFile, KeyFile: strangerKeyFile}}, ok: false},
		{name: "certificate and key files", clients: []upstream.ClientCert{{CertFile: certFile, KeyFile: keyFile}}, ok: true},
		{name: "certificate and key in one file", clients: []upstream.ClientCert{{CertFile: bothFile}}, ok: true},
		{name: "the accepted one of two", clients: []upstream.ClientCert{{CertFile: strangerCertFile, KeyFile: strangerKeyFile}, {CertFile: certFile, KeyFile: keyFile}}, ok: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(reg.clientNames())
			c := reg.client(func(string) upstream.TLSSettings {
				return upstream.TLSSettings{CAFiles: []string{caFile}, ClientCerts: tt.clients}
			})
			err := pull(t, c, "registry.test", img, layer)
			if !tt.ok {
				if err == nil || !errors.Is(err, upstream.ErrUnavailable) {
					t.Fatalf("pull = %v, want ErrUnavailable: the registry refuses the handshake", err)
				}
				if n := len(reg.clientNames()) - before; n != 0 {
					t.Errorf("the registry served %d requests", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("pull: %v", err)
			}
			names := reg.clientNames()[before:]
			if len(names) == 0 {
				t.Fatal("the registry saw no request")
			}
			for _, n := range names {
				if n != "node-1" {
					t.Errorf("a request came with client certificate %q, want node-1", n)
				}
			}
		})
	}
}

// TestTLSSettingsPerRegistry: two registry names served at the same endpoint get each their own
// settings; only the one whose settings trust the CA is reached.
func TestTLSSettingsPerRegistry(t *testing.T) {
	ca := newTestCA(t, "shoal test CA")
	reg := startTLSRegistry(t, ca, nil)
	img, image := pushImage(t, reg.plainHost, "test/app", "v1", 1)
	layer, _ := layerBytes(t, image)
	caFile := writeTestFile(t, t.TempDir(), "ca.pem", ca.pem)

	var mu sync.Mutex
	asked := map[string]int{}
	c := reg.client(func(registry string) upstream.TLSSettings {
		mu.Lock()
		asked[registry]++
		mu.Unlock()
		if registry == "private.test" {
			return upstream.TLSSettings{CAFiles: []string{caFile}}
		}
		return upstream.TLSSettings{}
	})
	if err := pull(t, c, "private.test", img, layer); err != nil {
		t.Errorf("private.test: %v", err)
	}
	wantTLSFailure(t, pull(t, c, "public.test", img, layer))
	if err := pull(t, c, "private.test", img, layer); err != nil {
		t.Errorf("private.test after public.test: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if asked["private.test"] < 4 || asked["public.test"] < 1 {
		t.Errorf("settings asked for %v, want private.test for each of its 4 requests and public.test at least once", asked)
	}
}

// TestTLSFilesAreReadForEveryRequest: a CA file rewritten while the agent runs takes effect at
// the next request, while connections are reused as long as it does not change.
func TestTLSFilesAreReadForEveryRequest(t *testing.T) {
	ca := newTestCA(t, "shoal test CA")
	other := newTestCA(t, "another CA")
	reg := startTLSRegistry(t, ca, nil)
	img, image := pushImage(t, reg.plainHost, "test/app", "v1", 1)
	layer, _ := layerBytes(t, image)
	caFile := writeTestFile(t, t.TempDir(), "ca.pem", other.pem)
	c := upstream.New(
		upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) { return reg.endpoint, nil }),
		upstream.WithTLSResolver(func(string, upstream.Endpoint) (upstream.TLSSettings, error) {
			return upstream.TLSSettings{CAFiles: []string{caFile}}, nil
		}))

	wantTLSFailure(t, pull(t, c, "registry.test", img, layer))
	if err := os.WriteFile(caFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := pull(t, c, "registry.test", img, layer); err != nil {
		t.Fatalf("after the CA file was fixed: %v", err)
	}
	conns := reg.conns.Load()
	for range 3 {
		if err := pull(t, c, "registry.test", img, layer); err != nil {
			t.Fatal(err)
		}
	}
	if n := reg.conns.Load() - conns; n != 0 {
		t.Errorf("3 more pulls with unchanged files opened %d new connections, want 0 (the transport is reused)", n)
	}
}

func TestTLSSettingsErrors(t *testing.T) {
	ca := newTestCA(t, "shoal test CA")
	reg := startTLSRegistry(t, ca, nil)
	dir := t.TempDir()
	source := filepath.Join(dir, "hosts.toml")
	caFile := writeTestFile(t, dir, "ca.pem", ca.pem)
	notPEM := writeTestFile(t, dir, "not.pem", []byte("not a certificate\n"))
	cert, _ := ca.issue(t, "node-1", false)
	certFile := writeTestFile(t, dir, "client.cert", cert)
	_, otherKey := ca.issue(t, "node-2", false)
	otherKeyFile := writeTestFile(t, dir, "other.key", otherKey)
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name     string
		settings upstream.TLSSettings
		want     []string // in the error
	}{
		{"missing CA file", upstream.TLSSettings{CAFiles: []string{caFile, missing}, Source: source},
			[]string{"registry.test", missing, source, "no such file"}},
		{"CA file without a certificate", upstream.TLSSettings{CAFiles: []string{notPEM}, Source: source},
			[]string{"registry.test", notPEM, "no PEM certificate"}},
		{"missing client key", upstream.TLSSettings{ClientCerts: []upstream.ClientCert{{CertFile: certFile, KeyFile: missing}}, Source: source},
			[]string{"registry.test", missing, "client key"}},
		{"key of another certificate", upstream.TLSSettings{ClientCerts: []upstream.ClientCert{{CertFile: certFile, KeyFile: otherKeyFile}}},
			[]string{"registry.test", certFile, otherKeyFile}},
		{"certificate without its key", upstream.TLSSettings{ClientCerts: []upstream.ClientCert{{CertFile: certFile}}},
			[]string{"registry.test", certFile}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := reg.client(func(string) upstream.TLSSettings { return tt.settings })
			checkErr := c.Check("registry.test")
			_, err := c.Manifest(testContext(t), "registry.test", "test/app", "v1", nil)
			for _, err := range []error{checkErr, err} {
				if err == nil || !errors.Is(err, upstream.ErrUnavailable) {
					t.Fatalf("err = %v, want ErrUnavailable", err)
				}
				for _, w := range tt.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not mention %q", err, w)
					}
				}
			}
			if n := len(reg.clientNames()); n != 0 {
				t.Errorf("the registry saw %d requests, want none", n)
			}
		})
	}

	if _, err := upstream.ReadCAFile(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("ReadCAFile(missing) = %v, want an error naming the file", err)
	}
	if _, err := upstream.ReadCAFile(notPEM); err == nil || !strings.Contains(err.Error(), notPEM) {
		t.Errorf("ReadCAFile(not PEM) = %v, want an error naming the file", err)
	}
	c := upstream.New(upstream.WithRootCAs(ca.cert), upstream.WithTransport(roundTripperFunc(http.DefaultTransport.RoundTrip)),
		upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) { return reg.endpoint, nil }))
	if err := c.Check("registry.test"); err == nil || !errors.Is(err, upstream.ErrUnavailable) {
		t.Errorf("root CAs with a transport they cannot be applied to: Check = %v, want ErrUnavailable", err)
	}
}

func mustDigest(t *testing.T, b []byte) v1.Hash {
	t.Helper()
	h, _, err := v1.SHA256(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
