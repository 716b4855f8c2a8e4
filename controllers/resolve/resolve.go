// Package resolve turns image and artifact references, as Prewarms and pods write them, into
// what nodes must fetch: the digest a reference points at and, for each platform asked for, the
// manifest and its blobs with their sizes. It authenticates with Kubernetes pull secrets, sends
// registries to the endpoints an air-gapped cluster uses, classifies failures as the API's
// FailureReason, and caches results: by digest for good, by tag for a short while, and never
// across credentials.
package resolve

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/oci"
)

const (
	// DefaultTagTTL is how long the resolution of a tag is reused. Tags move; a Prewarm resolves
	// its tags again every refreshInterval (one minute at least), so 30 s never hides a move for
	// long while sparing the registry the resolutions of many objects naming the same tag at once.
	DefaultTagTTL = 30 * time.Second
	// DefaultTimeout bounds each registry call (a manifest, a config, with the authentication
	// handshake of the first).
	DefaultTimeout = 30 * time.Second
	// DefaultCacheSize is how many results the cache holds.
	DefaultCacheSize = 1024

	// maxConfigSize bounds the image config read to learn a single manifest's platform; configs
	// are a few KiB, a long build history makes them tens.
	maxConfigSize = 4 << 20
	// manifestFetches is how many manifests of one index are fetched at once.
	manifestFetches = 4
	// attestationAnnotation marks the manifests of build attestations in an index (BuildKit
	// gives them the platform unknown/unknown): they are not a platform to run.
	attestationAnnotation = "vnd.docker.reference.type"
)

// Options are what one resolution needs besides the reference.
type Options struct {
	// Platforms are the os/arch[/variant] to resolve in an index (e.g. linux/amd64,
	// linux/arm64/v8), as a Prewarm's spec.platforms. Empty: every platform in the index.
	Platforms []string
	// PullSecrets are the bytes of pull secrets: a ".dockerconfigjson" or a legacy
	// ".dockercfg" each (see NewKeychain).
	PullSecrets [][]byte
}

// Result is what a reference points at.
type Result struct {
	// Repository is the canonical repository, e.g. index.docker.io/library/nginx.
	Repository name.Repository
	// Tag is the reference's tag ("latest" when none is written), or "" for a digest reference
	// written without one.
	Tag string
	// Digest is the digest the reference points at: an index or a manifest.
	Digest v1.Hash
	// MediaType is the media type of what Digest names.
	MediaType types.MediaType
	// Manifests are the manifests nodes fetch. For an index: one per platform asked for and
	// found (in the order asked), or every platform's when none was asked (attestations aside).
	// For a manifest: that manifest, unless platforms were asked and its own is not one of them.
	Manifests []Manifest
	// Unavailable are the platforms asked for, as written, that the index lacks (or that a
	// single image manifest is not). Resolve then also returns an error of reason
	// PlatformUnavailable.
	Unavailable []string

	// offered are the platforms the index or image has, for error messages.
	offered []string
}

// Manifest is one image or artifact manifest and the blobs it references.
type Manifest struct {
	// Digest is the manifest's digest.
	Digest v1.Hash
	// MediaType is the manifest's media type.
	MediaType types.MediaType
	// ArtifactType is the manifest's artifactType, or its config's media type when it has none
	// (for an image, the image config's).
	ArtifactType string
	// Platform is the platform the manifest is for: from the index, or for a single image
	// manifest from its config. Nil when unknown: an artifact, or a config that names none.
	Platform *v1.Platform
	// Size is the size of the manifest plus the size of every blob it references, in bytes.
	Size int64
	// Blobs are the config and then the layers, as the manifest describes them.
	Blobs []v1.Descriptor
}

// Size is the bytes one node holds for the result: the largest of its manifests.
func (r *Result) Size() int64 {
	var largest int64
	for _, m := range r.Manifests {
		largest = max(largest, m.Size)
	}
	return largest
}

// clone returns a copy that shares nothing with r, so that callers may change what they get
// without changing the cache.
func (r *Result) clone() *Result {
	out := *r
	out.Manifests = make([]Manifest, len(r.Manifests))
	for i, m := range r.Manifests {
		out.Manifests[i] = m
		if m.Platform != nil {
			out.Manifests[i].Platform = m.Platform.DeepCopy()
		}
		out.Manifests[i].Blobs = make([]v1.Descriptor, len(m.Blobs))
		for j := range m.Blobs {
			out.Manifests[i].Blobs[j] = *m.Blobs[j].DeepCopy()
		}
	}
	out.Unavailable = append([]string(nil), r.Unavailable...)
	out.offered = append([]string(nil), r.offered...)
	return &out
}

// Resolver resolves references, caching results. It is safe for concurrent use.
type Resolver struct {
	transport *endpointTransport
	timeout   time.Duration
	tagTTL    time.Duration
	now       func() time.Time
	metrics   *metrics

	mu      sync.Mutex
	cache   *lru
	flights map[string]*flight
}

// flight is a resolution in progress, which identical resolutions wait for instead of asking
// the registry again.
type flight struct {
	done    chan struct{}
	waiters int // resolutions waiting for this one (tests look)

	// Set before done is closed.
	result *Result
	err    error
	// abandoned: the resolution failed because its caller's context ended, which says
	// nothing about the registry: a waiter whose own context is live tries again.
	abandoned bool
}

// ResolverOption configures a Resolver.
type ResolverOption func(*config)

type config struct {
	endpoints map[string]string
	insecure  []string
	transport http.RoundTripper
	timeout   time.Duration
	tagTTL    time.Duration
	cacheSize int
	now       func() time.Time
	reg       prometheus.Registerer
}

// WithEndpoints says where registries are really served, by registry name as references write
// it: {"registry.test": "http://127.0.0.1:5000"}. Credentials are still chosen by the name. An
// endpoint may be plain HTTP only for a registry listed with WithInsecure.
func WithEndpoints(endpoints map[string]string) ResolverOption {
	return func(c *config) { c.endpoints = endpoints }
}

// WithInsecure lists registries (host[:port]) that may be reached over plain HTTP. No other
// is, loopback addresses included.
func WithInsecure(registries ...string) ResolverOption {
	return func(c *config) { c.insecure = append(c.insecure, registries...) }
}

// WithTransport sets the RoundTripper requests finally go through (default: go-containerregistry's
// remote.DefaultTransport, which honours the proxy environment variables). Private CAs go here.
func WithTransport(rt http.RoundTripper) ResolverOption {
	return func(c *config) { c.transport = rt }
}

// WithTimeout bounds each registry call (default DefaultTimeout).
func WithTimeout(d time.Duration) ResolverOption { return func(c *config) { c.timeout = d } }

// WithTagTTL sets how long a tag's resolution is reused (default DefaultTagTTL); zero or less
// resolves tags every time.
func WithTagTTL(d time.Duration) ResolverOption { return func(c *config) { c.tagTTL = d } }

// WithCacheSize sets how many results the cache holds (default DefaultCacheSize); zero or less
// caches nothing.
func WithCacheSize(n int) ResolverOption { return func(c *config) { c.cacheSize = n } }

// WithClock sets the clock that tag expiry follows (default time.Now).
func WithClock(now func() time.Time) ResolverOption { return func(c *config) { c.now = now } }

// WithRegisterer registers the resolver's metrics (nil: not registered):
// shoal_controller_resolutions_total{result}, shoal_controller_resolve_cache_total{result} and
// shoal_controller_resolve_duration_seconds.
func WithRegisterer(reg prometheus.Registerer) ResolverOption {
	return func(c *config) { c.reg = reg }
}

// New returns a Resolver. It fails on an endpoint or registry name that cannot be used.
func New(opts ...ResolverOption) (*Resolver, error) {
	c := config{timeout: DefaultTimeout, tagTTL: DefaultTagTTL, cacheSize: DefaultCacheSize, now: time.Now, transport: remote.DefaultTransport}
	for _, opt := range opts {
		opt(&c)
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.transport == nil {
		c.transport = remote.DefaultTransport
	}
	if c.timeout <= 0 {
		return nil, fmt.Errorf("registry call timeout %v: must be positive", c.timeout)
	}
	t := &endpointTransport{endpoints: map[string]endpoint{}, insecure: map[string]bool{}, base: c.transport}
	for _, registry := range c.insecure {
		key, err := normalizeRegistry(registry)
		if err != nil {
			return nil, fmt.Errorf("insecure registry: %w", err)
		}
		t.insecure[key] = true
	}
	for registry, raw := range c.endpoints {
		key, err := normalizeRegistry(registry)
		if err != nil {
			return nil, fmt.Errorf("endpoint of registry: %w", err)
		}
		ep, err := parseEndpoint(raw)
		if err != nil {
			return nil, fmt.Errorf("endpoint of %s: %w", registry, err)
		}
		if ep.scheme == "http" && !t.insecure[key] {
			return nil, fmt.Errorf("endpoint of %s: %s is plain HTTP: list %s as an insecure registry to allow it", registry, raw, registry)
		}
		t.endpoints[key] = ep
	}
	return &Resolver{
		transport: t,
		timeout:   c.timeout,
		tagTTL:    c.tagTTL,
		now:       c.now,
		metrics:   newMetrics(c.reg),
		cache:     newLRU(c.cacheSize),
		flights:   map[string]*flight{},
	}, nil
}

// query is one resolution, as the cache and the registry see it.
type query struct {
	ref       name.Reference
	platforms []platform
	auth      authn.Authenticator
	creds     string // credentialsID of auth
}

// key is the cache key of q: the canonical reference, the platforms and the credentials, so that
// a result fetched with one namespace's credentials never answers another's.
func (q query) key(ref name.Reference) string {
	var b strings.Builder
	b.WriteString(ref.Name())
	b.WriteByte('|')
	for i, p := range q.platforms {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(platformString(p.norm))
	}
	b.WriteByte('|')
	b.WriteString(q.creds)
	return b.String()
}

// Resolve resolves ref (registry/repository[:tag][@digest]; Docker Hub names may be short).
// Every error is an *Error; Reason says why. When some platforms asked for are unavailable,
// Resolve returns the result for the others (see Result.Unavailable) together with an error
// of reason PlatformUnavailable.
func (r *Resolver) Resolve(ctx context.Context, ref string, opts Options) (result *Result, err error) {
	defer func() { r.metrics.resolutions.WithLabelValues(resultLabel(err)).Inc() }()
	fail := func(reason v1alpha1.FailureReason, err error) error {
		return &Error{Reference: ref, Reason: reason, Err: err}
	}
	q, err := r.query(ctx, ref, opts)
	if err != nil {
		return nil, fail(v1alpha1.ReasonResolveFailed, err)
	}
	cached, err := r.lookup(ctx, q)
	if err != nil {
		return nil, fail(classify(err), err)
	}
	result = cached.clone()
	result.Tag = writtenTag(ref, q.ref)
	if len(result.Unavailable) > 0 {
		what := "image"
		if result.MediaType.IsIndex() {
			what = "index"
		}
		return result, fail(v1alpha1.ReasonPlatformUnavailable, fmt.Errorf("%s %s has no manifest for %s (it has %s)",
			what, result.Digest, strings.Join(result.Unavailable, ", "), orNone(result.offered)))
	}
	return result, nil
}

// query parses what Resolve was given and finds the credentials it will send.
func (r *Resolver) query(ctx context.Context, s string, opts Options) (query, error) {
	ref, err := ParseReference(s)
	if err != nil {
		return query{}, err
	}
	if registry, err := normalizeRegistry(ref.Context().RegistryStr()); err == nil && r.transport.insecure[registry] {
		if ref, err = parseReference(s, name.Insecure); err != nil {
			return query{}, err
		}
	}
	platforms, err := parsePlatforms(opts.Platforms)
	if err != nil {
		return query{}, err
	}
	kc, err := NewKeychain(opts.PullSecrets...)
	if err != nil {
		return query{}, err
	}
	auth, err := authn.Resolve(ctx, kc, ref.Context())
	if err != nil {
		return query{}, fmt.Errorf("credentials for %s: %w", ref.Context(), err)
	}
	ac, err := authn.Authorization(ctx, auth)
	if err != nil {
		return query{}, fmt.Errorf("credentials for %s: %w", ref.Context(), err)
	}
	return query{ref: ref, platforms: platforms, auth: auth, creds: credentialsID(ac)}, nil
}

// lookup answers q from the cache, from an identical resolution in progress, or from the registry.
func (r *Resolver) lookup(ctx context.Context, q query) (*Result, error) {
	key := q.key(q.ref)
	counted := false
	for {
		r.mu.Lock()
		if res, ok := r.cache.get(key, r.now()); ok {
			r.mu.Unlock()
			if !counted {
				r.metrics.cache.WithLabelValues(cacheHit).Inc()
			}
			return res, nil
		}
		if !counted {
			r.metrics.cache.WithLabelValues(cacheMiss).Inc()
			counted = true
		}
		f, inProgress := r.flights[key]
		if inProgress {
			f.waiters++
		} else {
			f = &flight{done: make(chan struct{})}
			r.flights[key] = f
		}
		r.mu.Unlock()

		if !inProgress {
			return r.fly(ctx, key, q, f)
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for the resolution in progress: %w", context.Cause(ctx))
		}
		if f.abandoned && ctx.Err() == nil {
			continue
		}
		return f.result, f.err
	}
}

// fly resolves q at the registry for every caller waiting on f, and caches the result.
func (r *Resolver) fly(ctx context.Context, key string, q query, f *flight) (*Result, error) {
	start := time.Now()
	res, err := r.fetch(ctx, q)
	r.metrics.duration.Observe(time.Since(start).Seconds())

	r.mu.Lock()
	if err == nil {
		r.cache.add(q.key(res.Repository.Digest(res.Digest.String())), res, time.Time{})
		if _, isTag := q.ref.(name.Tag); isTag && r.tagTTL > 0 {
			r.cache.add(key, res, r.now().Add(r.tagTTL))
		}
	}
	delete(r.flights, key)
	f.result, f.err, f.abandoned = res, err, err != nil && ctx.Err() != nil
	r.mu.Unlock()
	close(f.done)
	return res, err
}

// fetch resolves q at the registry.
func (r *Resolver) fetch(ctx context.Context, q query) (*Result, error) {
	puller, err := remote.NewPuller(
		remote.WithAuth(q.auth),
		remote.WithTransport(r.transport),
		remote.WithUserAgent("shoal-controller"),
		// No retries here, so that a registry call never sleeps past its timeout: the
		// controllers retry a failed resolution themselves, after a delay that grows with
		// each failure in a row, with jitter (controllers/backoff.go).
		remote.WithRetryStatusCodes(),
		remote.WithRetryPredicate(func(error) bool { return false }),
	)
	if err != nil {
		return nil, fmt.Errorf("set up registry client: %w", err)
	}
	repo := q.ref.Context()
	top, err := r.getManifest(ctx, puller, q.ref)
	if err != nil {
		return nil, err
	}
	if _, isTag := q.ref.(name.Tag); isTag {
		// The tag may name content resolved before, by digest or through another tag.
		r.mu.Lock()
		res, ok := r.cache.get(q.key(repo.Digest(top.Digest.String())), r.now())
		r.mu.Unlock()
		if ok {
			return res, nil
		}
	}

	res := &Result{Repository: repo, Digest: top.Digest, MediaType: top.MediaType}
	switch {
	case top.MediaType.IsIndex():
		err = r.resolveIndex(ctx, puller, res, top, q.platforms)
	case top.MediaType.IsSchema1():
		err = fmt.Errorf("%s is a Docker schema 1 manifest, which Shoal does not fetch: push the image again with a current client", top.Digest)
	default:
		err = r.resolveManifest(ctx, puller, res, top, q.platforms)
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

// getManifest fetches the manifest ref names.
func (r *Resolver) getManifest(ctx context.Context, puller *remote.Puller, ref name.Reference) (*remote.Descriptor, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	desc, err := puller.Get(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("get manifest %s: %w", ref.Identifier(), err)
	}
	if desc.Size > oci.MaxManifestSize {
		return nil, fmt.Errorf("manifest %s is %d bytes, more than the %d that Shoal's agents accept", desc.Digest, desc.Size, oci.MaxManifestSize)
	}
	if !desc.MediaType.IsIndex() && !desc.MediaType.IsImage() && !desc.MediaType.IsSchema1() {
		// A registry that answers with a generic content type: the body says what it is.
		if mt := oci.ManifestMediaType(desc.Manifest); mt != "" {
			desc.MediaType = types.MediaType(mt)
		}
	}
	return desc, nil
}

// resolveIndex fills res with the manifests of the platforms asked for in the index top.
func (r *Resolver) resolveIndex(ctx context.Context, puller *remote.Puller, res *Result, top *remote.Descriptor, asked []platform) error {
	index, err := v1.ParseIndexManifest(bytes.NewReader(top.Manifest))
	if err != nil {
		return fmt.Errorf("parse index %s: %w", top.Digest, err)
	}
	var runnable []v1.Descriptor
	for _, d := range index.Manifests {
		if isAttestation(d) {
			continue
		}
		runnable = append(runnable, d)
		if d.Platform != nil {
			res.offered = append(res.offered, platformString(normalizePlatform(*d.Platform)))
		}
	}
	chosen := runnable
	if len(asked) > 0 {
		chosen = nil
		for _, p := range asked {
			i := indexOfPlatform(runnable, p.norm)
			if i < 0 {
				res.Unavailable = append(res.Unavailable, p.asked)
				continue
			}
			chosen = append(chosen, runnable[i])
		}
	}

	res.Manifests = make([]Manifest, len(chosen))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(manifestFetches)
	for i, d := range chosen {
		g.Go(func() error {
			if d.MediaType.IsIndex() {
				return fmt.Errorf("index %s names another index, %s, for %s: nested indexes are not supported", top.Digest, d.Digest, platformOf(d.Platform))
			}
			child, err := r.getManifest(gctx, puller, res.Repository.Digest(d.Digest.String()))
			if err != nil {
				return fmt.Errorf("platform %s: %w", platformOf(d.Platform), err)
			}
			m, err := parseManifest(child)
			if err != nil {
				return fmt.Errorf("platform %s: %w", platformOf(d.Platform), err)
			}
			if d.Platform != nil {
				m.Platform = d.Platform.DeepCopy()
			}
			res.Manifests[i] = m
			return nil
		})
	}
	return g.Wait()
}

// resolveManifest fills res with the single manifest top, and its platform when it is an image.
func (r *Resolver) resolveManifest(ctx context.Context, puller *remote.Puller, res *Result, top *remote.Descriptor, asked []platform) error {
	m, err := parseManifest(top)
	if err != nil {
		return err
	}
	if m.Blobs[0].MediaType.IsConfig() {
		p, err := r.imagePlatform(ctx, puller, res.Repository, m.Blobs[0])
		if err != nil {
			return err
		}
		m.Platform = p
	}
	if m.Platform == nil || len(asked) == 0 {
		res.Manifests = []Manifest{m}
		return nil
	}
	own := normalizePlatform(*m.Platform)
	res.offered = []string{platformString(own)}
	matched := false
	for _, p := range asked {
		if platformString(p.norm) == platformString(own) {
			matched = true
		} else {
			res.Unavailable = append(res.Unavailable, p.asked)
		}
	}
	if matched {
		res.Manifests = []Manifest{m}
	}
	return nil
}

// parseManifest reads an image or artifact manifest.
func parseManifest(desc *remote.Descriptor) (Manifest, error) {
	mf, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		return Manifest{}, fmt.Errorf("parse manifest %s: %w", desc.Digest, err)
	}
	if mf.Config.Digest.Hex == "" {
		return Manifest{}, fmt.Errorf("manifest %s (%s) has no config: not an image or artifact manifest", desc.Digest, desc.MediaType)
	}
	m := Manifest{
		Digest:       desc.Digest,
		MediaType:    desc.MediaType,
		ArtifactType: mf.ArtifactType,
		Size:         desc.Size,
		Blobs:        append([]v1.Descriptor{mf.Config}, mf.Layers...),
	}
	if m.ArtifactType == "" {
		m.ArtifactType = string(mf.Config.MediaType)
	}
	for _, b := range m.Blobs {
		if b.Size < 0 || b.Digest.Hex == "" {
			return Manifest{}, fmt.Errorf("manifest %s: blob %q of size %d is not a valid descriptor", desc.Digest, b.Digest, b.Size)
		}
		m.Size += b.Size
	}
	return m, nil
}

// imagePlatform reads the platform an image config names, nil if it names none.
func (r *Resolver) imagePlatform(ctx context.Context, puller *remote.Puller, repo name.Repository, cfg v1.Descriptor) (*v1.Platform, error) {
	if cfg.Size > maxConfigSize {
		return nil, fmt.Errorf("image config %s is %d bytes, more than the %d read to learn its platform", cfg.Digest, cfg.Size, maxConfigSize)
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	blob, err := puller.Layer(ctx, repo.Digest(cfg.Digest.String()))
	if err != nil {
		return nil, fmt.Errorf("get image config %s: %w", cfg.Digest, err)
	}
	rc, err := blob.Compressed()
	if err != nil {
		return nil, fmt.Errorf("get image config %s: %w", cfg.Digest, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read image config %s: %w", cfg.Digest, err)
	}
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("image config %s is more than %d bytes", cfg.Digest, maxConfigSize)
	}
	var c struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
		Variant      string `json:"variant"`
		OSVersion    string `json:"os.version"`
	}
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("parse image config %s: %w", cfg.Digest, err)
	}
	if c.OS == "" || c.Architecture == "" {
		return nil, nil
	}
	return &v1.Platform{OS: c.OS, Architecture: c.Architecture, Variant: c.Variant, OSVersion: c.OSVersion}, nil
}

// indexOfPlatform returns the index of the first manifest for platform p, -1 if none.
func indexOfPlatform(manifests []v1.Descriptor, p v1.Platform) int {
	for i, d := range manifests {
		if d.Platform != nil && platformString(normalizePlatform(*d.Platform)) == platformString(p) {
			return i
		}
	}
	return -1
}

// isAttestation reports whether an index entry is a build attestation rather than a platform.
func isAttestation(d v1.Descriptor) bool {
	if d.Annotations[attestationAnnotation] == "attestation-manifest" {
		return true
	}
	return d.Platform != nil && d.Platform.OS == "unknown" && d.Platform.Architecture == "unknown"
}

func platformOf(p *v1.Platform) string {
	if p == nil {
		return "(none)"
	}
	return platformString(normalizePlatform(*p))
}

func orNone(ss []string) string {
	if len(ss) == 0 {
		return "no platform"
	}
	return strings.Join(ss, ", ")
}
