package upstream

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
)

// TLSSettings say how the client verifies a registry endpoint's certificate and proves itself
// to the registry: the ca, client and skip_verify of one host in a containerd hosts.toml. The
// files are read for every request, so renewed certificates take effect without a restart;
// connections are reused for as long as the files' contents stay the same.
type TLSSettings struct {
	// CAFiles are PEM files of CA certificates trusted for the endpoint, in addition to the
	// system roots and WithRootCAs.
	CAFiles []string
	// ClientCerts are offered when the registry asks for a client certificate; the first one
	// the registry accepts is used.
	ClientCerts []ClientCert
	// SkipVerify accepts any certificate the endpoint presents.
	SkipVerify bool
	// Source says where the settings come from (a hosts.toml, say), for error messages.
	Source string
}

func (s TLSSettings) empty() bool {
	return len(s.CAFiles) == 0 && len(s.ClientCerts) == 0 && !s.SkipVerify
}

// ClientCert is a client certificate and its private key, in PEM files.
type ClientCert struct {
	CertFile string
	// KeyFile is "" when the key is in CertFile.
	KeyFile string
}

// WithTLSResolver says which TLS settings a registry's endpoint needs (default: none; the
// system roots, and WithRootCAs, verify every registry). It is asked for every request.
// Settings that cannot be applied (an unreadable file, a file without a certificate, a key that
// does not match its certificate) fail the request with ErrUnavailable, naming the file.
func WithTLSResolver(resolve func(registry string, endpoint Endpoint) (TLSSettings, error)) Option {
	return func(o *options) { o.resolveTLS = resolve }
}

// WithRootCAs trusts certs, in addition to the system roots, for every registry.
func WithRootCAs(certs ...*x509.Certificate) Option {
	return func(o *options) { o.rootCAs = append(o.rootCAs, certs...) }
}

// ReadCAFile reads a PEM file of CA certificates (a bundle), e.g. for WithRootCAs. A file
// without any certificate is an error.
func ReadCAFile(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA file: %w", err)
	}
	certs, err := parseCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("CA file %s: %w", path, err)
	}
	return certs, nil
}

// parseCertificates returns the certificates of the PEM CERTIFICATE blocks in data, skipping
// other blocks and text, as x509.CertPool.AppendCertsFromPEM does, but failing on a block that
// does not parse rather than dropping it silently.
func parseCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" || len(block.Headers) != 0 {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate in it")
	}
	return certs, nil
}

// tlsFiles are the contents of the files of some TLSSettings, read for one request.
type tlsFiles struct {
	settings TLSSettings
	cas      [][]byte
	clients  [][2][]byte // certificate, key
}

func readTLSFiles(s TLSSettings) (tlsFiles, error) {
	named := ""
	if s.Source != "" {
		named = " named in " + s.Source
	}
	read := func(what, path string) ([]byte, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read %s%s: %w", what, named, err)
		}
		return b, nil
	}
	f := tlsFiles{settings: s}
	for _, path := range s.CAFiles {
		b, err := read("CA file", path)
		if err != nil {
			return tlsFiles{}, err
		}
		f.cas = append(f.cas, b)
	}
	for _, c := range s.ClientCerts {
		cert, err := read("client certificate", c.CertFile)
		if err != nil {
			return tlsFiles{}, err
		}
		key := cert
		if c.KeyFile != "" {
			if key, err = read("client key", c.KeyFile); err != nil {
				return tlsFiles{}, err
			}
		}
		f.clients = append(f.clients, [2][]byte{cert, key})
	}
	return f, nil
}

// id identifies the settings by the contents of their files.
func (f tlsFiles) id() [sha256.Size]byte {
	h := sha256.New()
	add := func(b []byte) {
		_ = binary.Write(h, binary.BigEndian, uint64(len(b)))
		h.Write(b)
	}
	add([]byte(fmt.Sprint(f.settings.SkipVerify, len(f.cas), len(f.clients))))
	for _, b := range f.cas {
		add(b)
	}
	for _, pair := range f.clients {
		add(pair[0])
		add(pair[1])
	}
	var id [sha256.Size]byte
	h.Sum(id[:0])
	return id
}

// config returns base (nil: the defaults) with the files' CAs added to its roots (the system
// roots when it has none), their client certificates, and skip_verify.
func (f tlsFiles) config(base *tls.Config) (*tls.Config, error) {
	cfg := &tls.Config{}
	if base != nil {
		cfg = base.Clone()
	}
	if len(f.cas) > 0 {
		var certs []*x509.Certificate
		for i, b := range f.cas {
			c, err := parseCertificates(b)
			if err != nil {
				return nil, fmt.Errorf("CA file %s: %w", f.settings.CAFiles[i], err)
			}
			certs = append(certs, c...)
		}
		cfg.RootCAs = withCerts(cfg.RootCAs, certs)
	}
	for i, pair := range f.clients {
		cert, err := tls.X509KeyPair(pair[0], pair[1])
		if err != nil {
			c := f.settings.ClientCerts[i]
			if c.KeyFile == "" {
				return nil, fmt.Errorf("client certificate %s (with its key in the same file): %w", c.CertFile, err)
			}
			return nil, fmt.Errorf("client certificate %s with key %s: %w", c.CertFile, c.KeyFile, err)
		}
		cfg.Certificates = append(cfg.Certificates, cert)
	}
	if f.settings.SkipVerify {
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}

// withCerts returns a copy of pool (the system roots when nil) with certs added.
func withCerts(pool *x509.CertPool, certs []*x509.Certificate) *x509.CertPool {
	if pool == nil {
		var err error
		if pool, err = x509.SystemCertPool(); err != nil {
			pool = x509.NewCertPool() // no system roots here: only the given CAs are trusted
		}
	} else {
		pool = pool.Clone()
	}
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool
}

// withTLSConfig returns a copy of rt whose TLS configuration is what configure makes of rt's.
// Only an *http.Transport can be configured.
func withTLSConfig(rt http.RoundTripper, configure func(*tls.Config) (*tls.Config, error)) (*http.Transport, error) {
	tr, ok := rt.(*http.Transport)
	if !ok {
		return nil, fmt.Errorf("TLS settings cannot be applied to a %T given with WithTransport; give an *http.Transport", rt)
	}
	cfg, err := configure(tr.TLSClientConfig)
	if err != nil {
		return nil, err
	}
	tr = tr.Clone()
	tr.TLSClientConfig = cfg
	return tr, nil
}

// endpointTLS is the transport of one registry endpoint with TLS settings of its own, and the
// id of the file contents it was built from.
type endpointTLS struct {
	id        [sha256.Size]byte
	transport *http.Transport
}

type endpointKey struct {
	registry string
	endpoint Endpoint
}

// transportFor returns the transport for requests to a registry's endpoint, with the endpoint's
// TLS settings applied, and an id of those settings (zero without any). The transport is reused
// while the settings' files keep their contents; when they change, the old transport's idle
// connections are closed.
func (c *Client) transportFor(registry string, endpoint Endpoint) (http.RoundTripper, [sha256.Size]byte, error) {
	var none [sha256.Size]byte
	if c.baseErr != nil {
		return nil, none, c.baseErr
	}
	if c.resolveTLS == nil {
		return c.base, none, nil
	}
	settings, err := c.resolveTLS(registry, endpoint)
	if err != nil {
		return nil, none, fmt.Errorf("TLS settings: %w", err)
	}
	if settings.empty() {
		return c.base, none, nil
	}
	files, err := readTLSFiles(settings)
	if err != nil {
		return nil, none, err
	}
	id := files.id()
	key := endpointKey{registry: registry, endpoint: endpoint}
	c.mu.Lock()
	current := c.endpointTLS[key]
	c.mu.Unlock()
	if current != nil && current.id == id {
		return current.transport, id, nil
	}
	tr, err := withTLSConfig(c.base, files.config)
	if err != nil {
		return nil, none, err
	}
	c.mu.Lock()
	if current = c.endpointTLS[key]; current != nil && current.id == id {
		c.mu.Unlock()
		return current.transport, id, nil // a concurrent request built the same one first
	}
	c.endpointTLS[key] = &endpointTLS{id: id, transport: tr}
	c.mu.Unlock()
	if current != nil {
		current.transport.CloseIdleConnections()
		c.log.Info("TLS settings changed, new connections use them", "registry", registry, "endpoint", endpoint.String(),
			"settings_source", settings.Source)
	}
	return tr, id, nil
}
