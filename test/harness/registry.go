package harness

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/crypto/bcrypt"
)

// DefaultRegistryBinary is where Debian installs its build of distribution 2.8.2
// (docker-registry). StartRegistry looks the command up in PATH first.
const DefaultRegistryBinary = "/usr/bin/docker-registry"

// registryBinary returns the docker-registry executable StartRegistry runs by default: the one
// in PATH, else DefaultRegistryBinary.
func registryBinary() (string, error) {
	path, lookErr := exec.LookPath("docker-registry")
	if lookErr == nil {
		return path, nil
	}
	if _, err := os.Stat(DefaultRegistryBinary); err != nil {
		return "", fmt.Errorf("docker-registry is not in PATH (%w) nor at %s: install it "+
			"(apt-get install docker-registry, or make deps) or pass WithBinary", lookErr, DefaultRegistryBinary)
	}
	return DefaultRegistryBinary, nil
}

// Registry is a docker-registry process on 127.0.0.1 (or the address WithListenAddr gives) with
// filesystem storage in its own directory and an access log that tests read to count what
// clients asked for.
type Registry struct {
	dir       string
	host      string
	scheme    string // https with WithTLS
	accessLog string
	proc      *process
	client    *http.Client
	// user and password, with WithBasicAuth, are demanded of every request.
	user, password string
}

// StartRegistry starts a registry whose config, storage and logs live under dir, and waits
// until it answers GET /v2/.
func StartRegistry(ctx context.Context, dir string, opts ...Option) (*Registry, error) {
	o := newOptions("", opts)
	if o.binary == "" {
		var err error
		if o.binary, err = registryBinary(); err != nil {
			return nil, fmt.Errorf("start registry: %w", err)
		}
	}
	host := o.listenAddr
	if host == "" {
		ports, err := FreePorts(1)
		if err != nil {
			return nil, err
		}
		host = fmt.Sprintf("127.0.0.1:%d", ports[0])
	}
	if err := checkLoopback(host); err != nil {
		return nil, fmt.Errorf("registry address: %w", err)
	}
	r := &Registry{
		dir:       dir,
		host:      host,
		scheme:    "http",
		accessLog: filepath.Join(dir, "access.log"),
		client:    loopbackHTTPClient(),
	}
	tlsConfig := ""
	if o.tlsCert != "" {
		var err error
		if r.client.Transport, err = trustingTransport(o.tlsCert); err != nil {
			return nil, err
		}
		r.scheme = "https"
		tlsConfig = fmt.Sprintf("  tls:\n    certificate: %s\n    key: %s\n", o.tlsCert, o.tlsKey)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create registry directory: %w", err)
	}
	storage := filepath.Join(dir, "storage")
	if o.storage != "" {
		storage = o.storage
	}
	if err := os.MkdirAll(storage, 0o755); err != nil {
		return nil, fmt.Errorf("create registry storage: %w", err)
	}
	authConfig := ""
	if o.authUser != "" {
		hash, err := bcrypt.GenerateFromPassword([]byte(o.authPass), bcrypt.MinCost)
		if err != nil {
			return nil, fmt.Errorf("registry htpasswd: %w", err)
		}
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(htpasswd, fmt.Appendf(nil, "%s:%s\n", o.authUser, hash), 0o600); err != nil {
			return nil, fmt.Errorf("registry htpasswd: %w", err)
		}
		r.user, r.password = o.authUser, o.authPass
		authConfig = fmt.Sprintf("auth:\n  htpasswd:\n    realm: shoal-harness\n    path: %s\n", htpasswd)
	}
	// The access log is written to stdout in combined log format, one line per finished
	// request; everything else the registry says goes to stderr.
	config := fmt.Sprintf(`version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: %s
  secret: shoal-harness-not-a-secret
%s%s`, storage, r.host, tlsConfig, authConfig)
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("write registry config: %w", err)
	}
	bin, args := inNetns(o.netns, o.binary, []string{"serve", configPath})
	var err error
	r.proc, err = startProcess("registry", filepath.Join(dir, "registry.log"), r.accessLog, o.logger, bin, args...)
	if err != nil {
		return nil, err
	}
	if err := r.proc.waitReady(ctx, "GET /v2/ answers", r.ping); err != nil {
		_ = r.proc.kill()
		return nil, err
	}
	return r, nil
}

func (r *Registry) ping(ctx context.Context) error { return r.get(ctx, r.URL()+"/v2/") }

// get succeeds when GET u answers 200.
func (r *Registry) get(ctx context.Context, u string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	if r.user != "" {
		req.SetBasicAuth(r.user, r.password)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return nil
}

// Host is the registry's address, "127.0.0.1:PORT" unless WithListenAddr chose another, as
// used in image references.
func (r *Registry) Host() string { return r.host }

// URL is the registry's base URL, "http://127.0.0.1:PORT" ("https://..." with WithTLS).
func (r *Registry) URL() string { return r.scheme + "://" + r.host }

// WithBasicAuth makes the registry demand user and password (htpasswd) of every request; push
// to it with Registry.Auth.
func WithBasicAuth(user, password string) Option {
	return func(o *options) { o.authUser, o.authPass = user, password }
}

// Auth is what pushes to the registry need: its basic credentials, or anonymous.
func (r *Registry) Auth() authn.Authenticator {
	if r.user == "" {
		return authn.Anonymous
	}
	return &authn.Basic{Username: r.user, Password: r.password}
}

// WithTLS makes the registry serve HTTPS with the PEM certificate and key in these files; the
// certificate must be valid for the registry's address. The harness's own requests (readiness,
// Sync) trust that certificate. PushImage and the other push helpers speak plain HTTP: push to
// the registry without TLS, then start it again with TLS on the same directory. Only
// StartRegistry reads it.
func WithTLS(certFile, keyFile string) Option {
	return func(o *options) { o.tlsCert, o.tlsKey = certFile, keyFile }
}

// trustingTransport is loopbackTransport trusting only the certificates in certFile.
func trustingTransport(certFile string) (*http.Transport, error) {
	pem, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("registry certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("registry certificate %s: no PEM certificate in it", certFile)
	}
	tr := loopbackTransport()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots}
	return tr, nil
}

// PID is the registry process's id.
func (r *Registry) PID() int { return r.proc.PID() }

// Close stops the registry (SIGTERM, then SIGKILL).
func (r *Registry) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*stopGrace)
	defer cancel()
	return r.proc.stop(ctx)
}

// Request is one line of the registry's access log.
type Request struct {
	Method    string
	Path      string // without the query
	Query     string
	Status    int
	Bytes     int64 // response body bytes written
	UserAgent string
}

// combinedLog matches the access log lines, e.g.
// 127.0.0.1 - - [21/Nov/2026:16:42:27 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
var combinedLog = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) "[^"]*" "(.*)"$`)

// Requests returns every request the registry has logged so far, oldest first. A request
// is logged once its response is complete; call Sync first to be sure a finished client
// request is in.
func (r *Registry) Requests() ([]Request, error) {
	f, err := os.Open(r.accessLog)
	if err != nil {
		return nil, fmt.Errorf("open registry access log: %w", err)
	}
	defer f.Close()
	var reqs []Request
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := combinedLog.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		status, _ := strconv.Atoi(m[3])
		n, _ := strconv.ParseInt(m[4], 10, 64) // "-" means none
		path, query, _ := strings.Cut(m[2], "?")
		reqs = append(reqs, Request{Method: m[1], Path: path, Query: query, Status: status, Bytes: n, UserAgent: m[5]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read registry access log: %w", err)
	}
	return reqs, nil
}

// CountRequests counts logged requests with the given method (any when "") whose path
// matches pathPattern.
func (r *Registry) CountRequests(method string, pathPattern *regexp.Regexp) (int, error) {
	reqs, err := r.Requests()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, req := range reqs {
		if (method == "" || req.Method == method) && pathPattern.MatchString(req.Path) {
			n++
		}
	}
	return n, nil
}

var blobPath = regexp.MustCompile(`^/v2/.+/blobs/(sha256:[0-9a-f]{64})$`)

// BlobGETs counts GET requests for each blob digest, whatever their status.
func (r *Registry) BlobGETs() (map[v1.Hash]int, error) {
	return r.BlobGETsWhere(func(Request) bool { return true })
}

// BlobGETsWhere counts GET requests for each blob digest among the requests keep accepts.
func (r *Registry) BlobGETsWhere(keep func(Request) bool) (map[v1.Hash]int, error) {
	reqs, err := r.Requests()
	if err != nil {
		return nil, err
	}
	counts := map[v1.Hash]int{}
	for _, req := range reqs {
		if h, ok := req.BlobDigest(); ok && keep(req) {
			counts[h]++
		}
	}
	return counts, nil
}

// BlobDigest returns the digest of the blob a GET request fetched; ok is false for any other
// request.
func (req Request) BlobDigest() (d v1.Hash, ok bool) {
	m := blobPath.FindStringSubmatch(req.Path)
	if req.Method != http.MethodGet || m == nil {
		return v1.Hash{}, false
	}
	h, err := v1.NewHash(m[1])
	return h, err == nil
}

// BlobBytes sums, for each blob digest, the body bytes the registry sent for GETs of it in
// reqs (ranges included).
func BlobBytes(reqs []Request) map[v1.Hash]int64 {
	sent := map[v1.Hash]int64{}
	for _, req := range reqs {
		if h, ok := req.BlobDigest(); ok {
			sent[h] += req.Bytes
		}
	}
	return sent
}

// Sync waits until the requests a client saw completed before Sync was called are in the
// access log: it sends a marker request and waits for its line. The registry logs a request
// right after writing its response, so earlier lines are there by the time the marker's is.
func (r *Registry) Sync(ctx context.Context) error {
	var b [8]byte
	_, _ = rand.Read(b[:])
	marker := "harness-sync=" + hex.EncodeToString(b[:])
	if err := r.get(ctx, r.URL()+"/v2/?"+marker); err != nil {
		return fmt.Errorf("registry sync request: %w", err)
	}
	return r.proc.waitReady(ctx, "the sync marker in the access log", func(context.Context) error {
		reqs, err := r.Requests()
		if err != nil {
			return err
		}
		for _, req := range reqs {
			if req.Query == marker {
				return nil
			}
		}
		return fmt.Errorf("marker %s not logged yet", marker)
	})
}

// loopbackHTTPClient never uses a proxy and refuses to dial anything but loopback, so a
// mistake in a test cannot send traffic off the machine even outside a namespace.
func loopbackHTTPClient() *http.Client {
	return &http.Client{Timeout: 2 * time.Minute, Transport: loopbackTransport()}
}

func loopbackTransport() *http.Transport {
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if err := checkLoopback(addr); err != nil {
				return nil, err
			}
			return dialer.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     30 * time.Second,
	}
}

// checkLoopback refuses addresses other than loopback IPs, except inside RunIsolated's
// namespace: that one has no link to the machine's network, so the only other addresses it
// can reach are those of namespaces the process built there itself (test/testbed's nodes).
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("dial %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return fmt.Errorf("dial %q: the harness only dials IP addresses", addr)
	}
	if !ip.IsLoopback() && !InIsolatedNetwork() {
		return fmt.Errorf("dial %q: outside an isolated network namespace the harness only dials loopback", addr)
	}
	return nil
}
