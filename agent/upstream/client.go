// Package upstream is the node agent's client for upstream OCI registries: it fetches manifests
// and (ranges of) blobs over the Distribution API, authenticating with go-containerregistry's
// ping and token flows, and fails fast with classified errors so that the mirror can send the
// container runtime on to its next host.
//
// A registry has a logical name (the one in image references, e.g. "docker.io" or
// "registry.test"), under which its credentials are looked up, and an Endpoint, where it is
// really served. Requests go only to the endpoint, to the token realm the endpoint names and to
// the blob locations it redirects to; the endpoint's Authorization header never follows a
// redirect to another host. An endpoint may need TLS settings of its own (a private CA, client
// certificates), given by WithTLSResolver; WithRootCAs adds CAs for every registry.
package upstream

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/oci"
)

// Timeouts bound every wait on a registry. Zero fields take the defaults.
type Timeouts struct {
	// Dial bounds opening a connection (default 2s). Only applies to the client's own
	// transport, not to one given with WithTransport.
	Dial time.Duration
	// ResponseHeader bounds the time from starting a request (including authenticating for it)
	// until the registry's response headers arrive (default 10s).
	ResponseHeader time.Duration
	// Manifest bounds a whole manifest fetch, body included (default 10s).
	Manifest time.Duration
	// BlobIdle fails a blob download that receives no byte for this long while it is being
	// read (default 30s). Time the caller spends not reading does not count.
	BlobIdle time.Duration
}

func (t Timeouts) withDefaults() Timeouts {
	if t.Dial <= 0 {
		t.Dial = 2 * time.Second
	}
	if t.ResponseHeader <= 0 {
		t.ResponseHeader = 10 * time.Second
	}
	if t.Manifest <= 0 {
		t.Manifest = 10 * time.Second
	}
	if t.BlobIdle <= 0 {
		t.BlobIdle = 30 * time.Second
	}
	return t
}

// DefaultAuthCacheTTL is how long an authenticated transport (a ping result and a bearer token
// for one repository) is reused. go-containerregistry's bearer transport fetches a new token by
// itself when the registry answers 401, so a token that expires earlier costs one round trip.
const DefaultAuthCacheTTL = 5 * time.Minute

// Client fetches manifests and blobs from upstream registries. It is safe for concurrent use.
type Client struct {
	resolve  func(registry string) (Endpoint, error)
	keychain authn.Keychain
	base     http.RoundTripper
	timeouts Timeouts
	authTTL  time.Duration
	metrics  *metrics
	log      *slog.Logger
	// resolveTLS gives an endpoint's own TLS settings; nil: none.
	resolveTLS func(registry string, endpoint Endpoint) (TLSSettings, error)
	// baseErr fails every request: WithRootCAs could not be applied to the transport.
	baseErr error

	mu          sync.Mutex
	transports  map[transportKey]*authEntry
	endpointTLS map[endpointKey]*endpointTLS
}

// Option configures a Client.
type Option func(*options)

type options struct {
	resolve   func(string) (Endpoint, error)
	keychains []authn.Keychain
	transport http.RoundTripper
	timeouts  Timeouts
	authTTL   time.Duration
	reg       prometheus.Registerer
	log       *slog.Logger
	// TLS (tls.go)
	resolveTLS func(string, Endpoint) (TLSSettings, error)
	rootCAs    []*x509.Certificate
}

// WithEndpointResolver says where a logical registry is served (default DefaultEndpoint).
func WithEndpointResolver(resolve func(registry string) (Endpoint, error)) Option {
	return func(o *options) { o.resolve = resolve }
}

// WithKeychain adds a source of credentials. Credentials are looked up by the logical registry
// name ("registry.test/app"), never by the endpoint's host. Without any keychain every registry
// is accessed anonymously; ~/.docker is never read.
func WithKeychain(kc authn.Keychain) Option {
	return func(o *options) { o.keychains = append(o.keychains, kc) }
}

// WithAuthFile adds the credentials of a docker config.json (see AuthFileKeychain).
func WithAuthFile(path string) Option { return WithKeychain(AuthFileKeychain(path)) }

// WithTransport sets the RoundTripper requests go through (default: an http.Transport with the
// Dial timeout that honours the proxy environment variables). WithRootCAs and TLS settings need
// it to be an *http.Transport, which they copy.
func WithTransport(rt http.RoundTripper) Option { return func(o *options) { o.transport = rt } }

// WithTimeouts sets the timeouts; zero fields keep their defaults.
func WithTimeouts(t Timeouts) Option { return func(o *options) { o.timeouts = t } }

// WithAuthCacheTTL sets how long an authenticated transport is reused (default
// DefaultAuthCacheTTL); zero or less authenticates for every request.
func WithAuthCacheTTL(d time.Duration) Option { return func(o *options) { o.authTTL = d } }

// WithRegisterer registers the client's metrics (nil: not registered):
// shoal_upstream_requests_total{registry,kind,code}, shoal_upstream_request_duration_seconds{registry,kind}
// and shoal_upstream_bytes_total{registry}. The registry label names at most MaxRegistryLabels
// registries.
func WithRegisterer(reg prometheus.Registerer) Option { return func(o *options) { o.reg = reg } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// New returns a Client.
func New(opts ...Option) *Client {
	o := options{resolve: func(r string) (Endpoint, error) { return DefaultEndpoint(r), nil }, authTTL: DefaultAuthCacheTTL}
	for _, opt := range opts {
		opt(&o)
	}
	c := &Client{
		resolve:    o.resolve,
		keychain:   authn.NewMultiKeychain(o.keychains...),
		base:       o.transport,
		timeouts:   o.timeouts.withDefaults(),
		authTTL:    o.authTTL,
		metrics:    newMetrics(o.reg),
		log:        o.log,
		transports: map[transportKey]*authEntry{},

		resolveTLS:  o.resolveTLS,
		endpointTLS: map[endpointKey]*endpointTLS{},
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.base == nil {
		c.base = &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: c.timeouts.Dial, KeepAlive: 30 * time.Second}).DialContext,
			TLSHandshakeTimeout:   c.timeouts.ResponseHeader,
			ResponseHeaderTimeout: c.timeouts.ResponseHeader,
			ForceAttemptHTTP2:     true,
			MaxIdleConnsPerHost:   32,
			IdleConnTimeout:       90 * time.Second,
		}
	}
	if len(o.rootCAs) > 0 {
		base, err := withTLSConfig(c.base, func(cfg *tls.Config) (*tls.Config, error) {
			if cfg = cfg.Clone(); cfg == nil {
				cfg = &tls.Config{}
			}
			cfg.RootCAs = withCerts(cfg.RootCAs, o.rootCAs)
			return cfg, nil
		})
		if err != nil {
			c.baseErr = fmt.Errorf("root CAs: %w", err)
		} else {
			c.base = base
		}
	}
	return c
}

// CloseIdleConnections closes the connections to registries that no request is using, on the
// client's transport and on the transports of endpoints with TLS settings of their own, as
// http.Client's method of the same name does. Requests in progress go on; later requests open
// new connections.
func (c *Client) CloseIdleConnections() {
	type idleCloser interface{ CloseIdleConnections() }
	if ic, ok := c.base.(idleCloser); ok {
		ic.CloseIdleConnections()
	}
	c.mu.Lock()
	own := make([]*http.Transport, 0, len(c.endpointTLS))
	for _, e := range c.endpointTLS {
		own = append(own, e.transport)
	}
	c.mu.Unlock()
	for _, tr := range own {
		tr.CloseIdleConnections()
	}
}

// target is one repository of one registry, where it is served, and the transport that reaches
// it (with the endpoint's TLS settings, identified by tlsID).
type target struct {
	registry  string
	repo      string
	endpoint  Endpoint
	transport http.RoundTripper
	tlsID     [sha256.Size]byte
}

func (c *Client) target(registry, repo string) (target, *Error) {
	if err := oci.ValidateRegistry(registry); err != nil {
		return target{}, &Error{Registry: registry, Err: err, kind: ErrBadRequest}
	}
	if err := oci.ValidateRepository(repo); err != nil {
		return target{}, &Error{Registry: registry, Err: err, kind: ErrBadRequest}
	}
	t, err := c.reach(registry)
	t.repo = repo
	return t, err
}

// reach finds where a valid registry is served and the transport that reaches it. Its failures
// are local configuration problems, on which the runtime should go straight upstream.
func (c *Client) reach(registry string) (target, *Error) {
	endpoint, err := c.resolve(registry)
	if err != nil {
		return target{}, &Error{Registry: registry, Err: fmt.Errorf("resolve endpoint: %w", err), kind: ErrUnavailable}
	}
	rt, tlsID, err := c.transportFor(registry, endpoint)
	if err != nil {
		return target{}, &Error{Registry: registry, Endpoint: endpoint.String(), Err: err, kind: ErrUnavailable}
	}
	return target{registry: registry, endpoint: endpoint, transport: rt, tlsID: tlsID}, nil
}

// Check prepares requests to registry as every request does (resolving its endpoint, reading
// the files of its TLS settings) without sending any, so that a configuration problem shows
// before the first pull. A registry checked is one the caller means to use: the metrics name
// it (see MaxRegistryLabels) even while it cannot be reached.
func (c *Client) Check(registry string) error {
	op := "prepare to pull"
	if err := oci.ValidateRegistry(registry); err != nil {
		return &Error{Registry: registry, Op: op, Err: err, kind: ErrBadRequest}
	}
	c.metrics.registries.admit(registry)
	if _, err := c.reach(registry); err != nil {
		err.Op = op
		return err
	}
	return nil
}

// fail builds the error for op on t.
func (t target) fail(op string, status int, code string, kind, err error) *Error {
	return &Error{Registry: t.registry, Endpoint: t.endpoint.String(), Op: op, StatusCode: status, Code: code, Err: err, kind: kind}
}

// do sends a request for path on t's endpoint and returns once the response headers are in,
// or fails after the ResponseHeader timeout. The response body stays readable until the caller
// closes it, which also releases the request's context.
func (c *Client) do(ctx context.Context, t target, kind, op, method, path string, header http.Header) (*http.Response, *Error) {
	ctx, cancel := context.WithCancelCause(ctx)
	noAnswer := fmt.Errorf("no response within %s: %w", c.timeouts.ResponseHeader, context.DeadlineExceeded)
	timer := time.AfterFunc(c.timeouts.ResponseHeader, func() { cancel(noAnswer) })
	start := time.Now()

	var resp *http.Response
	client, aerr := c.authenticated(ctx, t)
	var err error
	if aerr == nil {
		req, rerr := http.NewRequestWithContext(ctx, method, t.endpoint.url(path), nil)
		if rerr != nil {
			timer.Stop()
			cancel(nil)
			return nil, t.fail(op, 0, "", ErrBadRequest, rerr)
		}
		maps.Copy(req.Header, header)
		resp, err = client.Do(req)
		status := 0
		if err == nil {
			status = resp.StatusCode
		}
		c.metrics.observe(t.registry, kind, status, time.Since(start))
		attrs := []any{"registry", t.registry, "method", method, "url", req.URL.String(),
			"status", status, "duration", time.Since(start)}
		if err != nil {
			attrs = append(attrs, "error", err)
		}
		c.log.Debug("upstream request", attrs...)
	}
	if !timer.Stop() && err == nil && aerr == nil {
		// The headers arrived just as the timer fired: the body is already cut off.
		resp.Body.Close()
		err = noAnswer
	}
	if aerr != nil || err != nil {
		cause := context.Cause(ctx)
		cancel(nil)
		if aerr != nil && aerr.kind != nil {
			failed := *aerr // shared by every request waiting on the handshake
			failed.Op = op + ": " + aerr.Op
			return nil, &failed
		}
		if cause != nil {
			// Say "no response within 10s" rather than "context canceled".
			return nil, t.fail(op, 0, "", failureKind(cause), cause)
		}
		status, code, errKind := transportFailure(err)
		return nil, t.fail(op, status, code, errKind, err)
	}
	resp.Body = cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

// cancelOnClose releases a request's context when its response body is closed.
type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelCauseFunc
}

func (b cancelOnClose) Close() error {
	err := b.ReadCloser.Close()
	b.cancel(nil)
	return err
}

// transportKey identifies an authenticated transport: always the pull scope of one repository,
// over one version of the endpoint's TLS settings.
type transportKey struct {
	registry string
	endpoint Endpoint
	repo     string
	tlsID    [sha256.Size]byte
}

// authEntry is an authenticated client, or the handshake producing it (done not yet closed).
type authEntry struct {
	done    chan struct{}
	client  *http.Client
	err     *Error
	expires time.Time
}

func (e *authEntry) usable(now time.Time) bool {
	select {
	case <-e.done:
		return e.err == nil && now.Before(e.expires)
	default:
		return true // in progress: wait for it rather than start another handshake
	}
}

// authenticated returns a client authenticated for pulling t's repository, from the cache or by
// a new handshake. Concurrent callers share one handshake; it runs on its own deadline so that
// the caller that started it can give up without failing the others.
func (c *Client) authenticated(ctx context.Context, t target) (*http.Client, *Error) {
	key := transportKey{registry: t.registry, endpoint: t.endpoint, repo: t.repo, tlsID: t.tlsID}
	now := time.Now()
	c.mu.Lock()
	e, ok := c.transports[key]
	if !ok || !e.usable(now) {
		for k, old := range c.transports {
			if !old.usable(now) {
				delete(c.transports, k)
			}
		}
		e = &authEntry{done: make(chan struct{})}
		c.transports[key] = e
		go c.handshake(context.WithoutCancel(ctx), t, e)
	}
	c.mu.Unlock()
	select {
	case <-e.done:
		return e.client, e.err
	case <-ctx.Done():
		return nil, t.fail("authenticate", 0, "", nil, ctx.Err()) // do() reports the cause
	}
}

// handshake pings the endpoint and, if it asks for a bearer token, fetches one for the pull scope
// of t's repository with the credentials of t's logical registry.
func (c *Client) handshake(ctx context.Context, t target, e *authEntry) {
	defer close(e.done)
	ctx, cancel := context.WithTimeout(ctx, c.timeouts.ResponseHeader)
	defer cancel()
	start := time.Now()
	op := "authenticate"
	rt, until, err := c.newTransport(ctx, t)
	if err != nil {
		status, code, kind := transportFailure(err)
		if ctx.Err() != nil {
			kind = ErrUnavailable
			err = fmt.Errorf("no answer within %s: %w", c.timeouts.ResponseHeader, err)
		}
		c.metrics.observe(t.registry, kindToken, status, time.Since(start))
		c.log.Warn("upstream authentication failed", "registry", t.registry, "endpoint", t.endpoint.String(),
			"repository", t.repo, "error", err)
		e.err = t.fail(op, status, code, kind, err)
		return
	}
	c.metrics.registries.admit(t.registry) // it speaks the Distribution API: a real registry
	c.metrics.observe(t.registry, kindToken, http.StatusOK, time.Since(start))
	e.client = &http.Client{Transport: rt}
	e.expires = time.Now().Add(c.authTTL)
	if !until.IsZero() && until.Before(e.expires) {
		e.expires = until
	}
}

// Expiring is an authenticator whose credentials stop working at some time (a pull token); the
// client uses it no longer than that, and asks its keychain again after.
type Expiring interface {
	authn.Authenticator
	Expires() time.Time
}

// newTransport returns an authenticated transport for t, and until when its credentials hold
// (zero: no bound of their own).
func (c *Client) newTransport(ctx context.Context, t target) (http.RoundTripper, time.Time, error) {
	var opts []name.Option
	if t.endpoint.Scheme == "http" {
		opts = append(opts, name.Insecure)
	}
	endpoint, err := name.NewRegistry(t.endpoint.Host, opts...)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("endpoint %s: %w", t.endpoint, err)
	}
	logical, err := name.NewRegistry(t.registry)
	if err != nil {
		return nil, time.Time{}, err
	}
	auth, err := authn.Resolve(ctx, c.keychain, logical.Repo(t.repo))
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: %w", errCredentials, err)
	}
	var until time.Time
	if x, ok := auth.(Expiring); ok {
		until = x.Expires()
	}
	inner := transport.NewUserAgent(pinScheme{endpoint: t.endpoint, inner: t.transport}, "shoal")
	scope := "repository:" + t.repo + ":" + transport.PullScope
	rt, err := transport.NewWithContext(ctx, endpoint, auth, inner, []string{scope})
	return rt, until, err
}

// errCredentials marks a failure to read credentials (e.g. a broken auth file): nothing was
// sent, and the request cannot be authenticated.
var errCredentials = errors.New("look up credentials")

// pinScheme sends every request for the endpoint's host with the endpoint's scheme.
// go-containerregistry's ping guesses the scheme (https, then http for loopback and private
// addresses); the endpoint already says which one, so no TLS probe goes to a plain-HTTP registry
// and an https endpoint is never downgraded. (A failed ping's error still quotes the https URL
// go-containerregistry built; the request itself used the endpoint's scheme.)
type pinScheme struct {
	endpoint Endpoint
	inner    http.RoundTripper
}

func (p pinScheme) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == p.endpoint.Host && r.URL.Scheme != p.endpoint.Scheme {
		r = r.Clone(r.Context())
		r.URL.Scheme = p.endpoint.Scheme
	}
	return p.inner.RoundTrip(r)
}
