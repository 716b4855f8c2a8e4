// Package mirror serves the pull side of the OCI Distribution API to the node's container runtime.
// containerd reaches it through hosts.toml and names the upstream registry with ?ns=; the mirror
// answers from the node-local store, streams misses from upstream while keeping them, and fails
// fast with a status that makes containerd try its next host whenever it cannot help.
package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/oci"
)

// BlobStore is the part of the content store the mirror uses.
type BlobStore interface {
	Get(d v1.Hash) (store.Blob, error)
	Fetch(ctx context.Context, d v1.Hash, src store.Source) (store.Blob, error)
}

// Upstream is the part of the registry client the mirror uses.
type Upstream interface {
	Manifest(ctx context.Context, registry, repo, reference string, accept []string) (*upstream.Manifest, error)
	HeadManifest(ctx context.Context, registry, repo, reference string, accept []string) (v1.Descriptor, error)
	Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error)
	HeadBlob(ctx context.Context, registry, repo string, d v1.Hash) (int64, error)
}

// Mirror is an http.Handler for the Distribution API pull endpoints.
type Mirror struct {
	store           BlobStore
	upstream        Upstream
	log             *slog.Logger
	defaultRegistry string
	allowed         func(registry string) bool
	manifestTimeout time.Duration
	metrics         *metrics
	blobSource      func(registry, repo string, d v1.Hash) store.Source
	missSource      string // metric label of blobs fetched through blobSource
	firstByte       time.Duration
	bodyIdle        time.Duration
}

// Option configures a Mirror.
type Option func(*Mirror)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(m *Mirror) { m.log = l } }

// WithDefaultRegistry sets the registry for requests without ?ns= (clients other than containerd).
func WithDefaultRegistry(registry string) Option {
	return func(m *Mirror) { m.defaultRegistry = registry }
}

// WithAllowedRegistries restricts which upstream registries the mirror fetches from; others get
// 404 so the runtime goes to its next host. The default allows every registry.
func WithAllowedRegistries(allowed func(registry string) bool) Option {
	return func(m *Mirror) { m.allowed = allowed }
}

// WithManifestTimeout bounds how long resolving a manifest upstream may take before the mirror
// gives up and lets the runtime go to its next host.
func WithManifestTimeout(d time.Duration) Option { return func(m *Mirror) { m.manifestTimeout = d } }

// WithBlobSource sets where missing blobs come from (the swarm); by default they are fetched
// from upstream whole.
func WithBlobSource(source func(registry, repo string, d v1.Hash) store.Source) Option {
	return func(m *Mirror) { m.blobSource, m.missSource = source, sourceSwarm }
}

// WithRegisterer registers the mirror's metrics.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(m *Mirror) { m.metrics = newMetrics(reg) }
}

// New returns a Mirror serving from s and fetching misses from up.
func New(s BlobStore, up Upstream, opts ...Option) *Mirror {
	m := &Mirror{
		store:           s,
		upstream:        up,
		log:             slog.New(slog.DiscardHandler),
		defaultRegistry: "docker.io",
		allowed:         func(string) bool { return true },
		manifestTimeout: 10 * time.Second,
		firstByte:       DefaultFirstByteTimeout,
		bodyIdle:        DefaultBodyIdleTimeout,
	}
	for _, opt := range opts {
		opt(m)
	}
	if m.metrics == nil {
		m.metrics = newMetrics(nil)
	}
	if m.blobSource == nil {
		m.blobSource, m.missSource = m.upstreamSource, sourceUpstream
	}
	return m
}

// ServeHTTP implements http.Handler.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	req, err := ParseRequest(r.Method, r.URL, m.defaultRegistry)
	if err != nil {
		status := m.writeError(w, r, nil, err)
		m.metrics.count("invalid", answer{}, resultOf(status))
		return
	}
	if req.Kind == KindBase {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(w, "{}")
		}
		return
	}
	if !m.allowed(req.Registry) {
		status := m.writeError(w, r, req, badRequest(http.StatusNotFound, "NAME_UNKNOWN", "registry %s is not mirrored by this agent", req.Registry))
		m.metrics.count(req.Kind.String(), answer{}, resultOf(status))
		return
	}
	m.serveGuarded(w, r, req.Kind.String(), func(g *guardedWriter, r *http.Request) { m.serveContent(g, r, req) })
}

// serveContent answers a manifest or blob request and counts it; it runs under serveGuarded's
// watch, which counts the request instead when it answers or cuts the response itself.
func (m *Mirror) serveContent(g *guardedWriter, r *http.Request, req *Request) {
	start := time.Now()
	var err error
	if req.Kind == KindManifest {
		err = m.serveManifest(g, r, req)
	} else {
		err = m.serveBlob(g, r, req)
	}
	aborted := false
	if err != nil {
		if !g.sent() {
			m.writeError(g, r, req, err)
		} else {
			// Headers are gone: the only honest signal left is to cut the connection short of
			// Content-Length, so the client never takes a partial body for a complete one.
			aborted = true
		}
	}
	a, owned := g.settle()
	if !owned {
		return // the watch answered or cut the response, and counted it
	}
	result := resultOf(a.status)
	if aborted {
		result = resultAborted
		m.log.Warn("response aborted mid-body", "registry", req.Registry, "repository", req.Repository,
			"reference", req.Reference, "source", a.source, "bytes_sent", a.bytes, "error", err)
	}
	m.metrics.count(req.Kind.String(), a, result)
	m.log.Debug("served", "method", r.Method, "kind", req.Kind.String(), "registry", req.Registry,
		"repository", req.Repository, "reference", req.Reference, "source", a.source, "result", result,
		"status", a.status, "bytes_sent", a.bytes, "duration", time.Since(start))
}

func (m *Mirror) serveManifest(w *guardedWriter, r *http.Request, req *Request) error {
	if req.HasDigest {
		if blob, err := m.store.Get(req.Digest); err == nil {
			defer blob.Close()
			w.from(sourceLocal)
			body, err := io.ReadAll(io.LimitReader(blob, oci.MaxManifestSize+1))
			if err != nil {
				return fmt.Errorf("read cached manifest %s: %w", req.Digest, err)
			}
			if len(body) <= oci.MaxManifestSize {
				writeManifest(w, r, body, oci.ManifestMediaType(body), req.Digest)
				return nil
			}
		}
	}
	w.from(sourceUpstream)
	ctx, cancel := context.WithTimeout(r.Context(), m.manifestTimeout)
	defer cancel()
	accept := r.Header.Values("Accept")
	if len(accept) == 0 {
		accept = oci.ManifestMediaTypes
	}
	if r.Method == http.MethodHead && !req.HasDigest {
		desc, err := m.upstream.HeadManifest(ctx, req.Registry, req.Repository, req.Reference, accept)
		if err != nil {
			return err
		}
		w.Header().Set("Content-Type", string(desc.MediaType))
		w.Header().Set("Content-Length", strconv.FormatInt(desc.Size, 10))
		w.Header().Set("Docker-Content-Digest", desc.Digest.String())
		w.WriteHeader(http.StatusOK)
		return nil
	}
	manifest, err := m.upstream.Manifest(ctx, req.Registry, req.Repository, req.Reference, accept)
	if err != nil {
		return err
	}
	m.keepManifest(manifest)
	mediaType := manifest.MediaType
	if mediaType == "" {
		mediaType = oci.ManifestMediaType(manifest.Body)
	}
	writeManifest(w, r, manifest.Body, mediaType, manifest.Digest)
	return nil
}

// keepManifest stores a manifest by digest so that later pulls by digest (every pull after the
// tag is resolved) and peers are served locally. The store verifies the digest again.
func (m *Mirror) keepManifest(manifest *upstream.Manifest) {
	body := manifest.Body
	src := func(context.Context) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(body)), int64(len(body)), nil
	}
	blob, err := m.store.Fetch(context.Background(), manifest.Digest, src)
	if err != nil {
		m.log.Warn("could not keep manifest", "digest", manifest.Digest, "error", err)
		return
	}
	// Reading to the end waits for the store to verify and commit the manifest.
	if _, err := io.Copy(io.Discard, blob); err != nil {
		m.log.Warn("could not keep manifest", "digest", manifest.Digest, "error", err)
	}
	_ = blob.Close()
}

func writeManifest(w http.ResponseWriter, r *http.Request, body []byte, mediaType string, digest v1.Hash) {
	if mediaType == "" {
		mediaType = oci.MediaTypeOCIManifest
	}
	w.Header().Set("Content-Type", mediaType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Docker-Content-Digest", digest.String())
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

func (m *Mirror) serveBlob(w *guardedWriter, r *http.Request, req *Request) error {
	blob, err := m.store.Get(req.Digest)
	w.from(sourceLocal)
	if errors.Is(err, store.ErrNotFound) {
		if r.Method == http.MethodHead {
			w.from(sourceUpstream)
			return m.headBlobUpstream(w, r, req)
		}
		w.from(m.missSource)
		blob, err = m.store.Fetch(r.Context(), req.Digest, m.blobSource(req.Registry, req.Repository, req.Digest))
	}
	if err != nil {
		return err
	}
	defer blob.Close()

	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Docker-Content-Digest", req.Digest.String())
	w.Header().Set("Etag", `"`+req.Digest.String()+`"`)
	if _, onDisk := blob.(syscall.Conn); onDisk {
		// A complete blob on disk: handing it to net/http unwrapped lets it use sendfile(2).
		http.ServeContent(w, r, "", time.Time{}, blob)
		return nil
	}
	// A blob still downloading: its download has started (the store has an answer from its
	// source), so headers go at once and the bytes follow as they arrive, under the body-idle
	// bound (see serveGuarded). Waiting for the first bytes before the headers was measured to
	// cost healthy pulls: at 32 nodes a few readers' first pieces took over 8 s to arrive, and
	// those pulls were sent to the registry.
	size := blob.Size()
	switch {
	case size < 0:
		// Unknown length (an upstream without Content-Length): the whole body, no ranges.
		return streamInflight(w, r, blob, http.StatusOK, 0, -1, -1)
	case plainGet(r):
		w.Header().Set("Accept-Ranges", "bytes")
		return streamInflight(w, r, blob, http.StatusOK, 0, size, size)
	}
	if start, end, ok := singleRange(r, size); ok {
		// How containerd resumes a partly fetched blob: served as the bytes arrive.
		w.Header().Set("Accept-Ranges", "bytes")
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end, size))
		return streamInflight(w, r, blob, http.StatusPartialContent, start, end-start+1, size)
	}
	// HEAD, conditional and multi-range requests: net/http's implementation.
	reader := &errorRecordingReadSeeker{rs: blob}
	http.ServeContent(w, r, "", time.Time{}, reader)
	if reader.err != nil {
		return fmt.Errorf("stream blob %s: %w", req.Digest, reader.err)
	}
	return nil
}

// streamInflight answers with status and length bytes of blob from start (-1: to its end), as
// they arrive. size is the blob's, -1 if unknown.
//
// With a length, a store.Sender hands net/http sections of the blob's file, which it sends with
// sendfile(2): no byte is read or written by the agent itself. Without one (chunked encoding,
// which net/http copies through 32 KiB buffers) the bytes are copied in 1 MiB blocks, as
// http.ServeContent's 32 KiB would cost a file read and a socket write each.
func streamInflight(w http.ResponseWriter, r *http.Request, blob store.Blob, status int, start, length, size int64) error {
	if length >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(length, 10))
	}
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	var n int64
	var err error
	if sender, ok := blob.(store.Sender); ok && length >= 0 {
		n, err = sender.SendTo(w, start, length)
	} else {
		n, err = copyInflight(w, blob, start, length)
	}
	if err != nil {
		return fmt.Errorf("stream blob at %d: %w", start+n, err)
	}
	if length >= 0 && n != length {
		return fmt.Errorf("stream blob: %d of %d bytes from %d (blob of %d): %w", n, length, start, size, io.ErrUnexpectedEOF)
	}
	return nil
}

// copyInflight copies length bytes of blob from start (-1: to its end) to w through a buffer.
func copyInflight(w io.Writer, blob store.Blob, start, length int64) (int64, error) {
	bufp, _ := streamBuffers.Get().(*[]byte)
	defer streamBuffers.Put(bufp)
	if _, err := blob.Seek(start, io.SeekStart); err != nil {
		return 0, fmt.Errorf("seek to %d: %w", start, err)
	}
	body := io.Reader(blob)
	if length >= 0 {
		body = io.LimitReader(blob, length)
	}
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{body}, *bufp)
}

// singleRange returns the one byte range a plain GET asks for ("bytes=START-" or
// "bytes=START-END", START within the blob) and whether the request is of that form; anything
// else (suffix, several ranges, conditions, a range past the end) is left to http.ServeContent.
func singleRange(r *http.Request, size int64) (start, end int64, ok bool) {
	rng := r.Header.Get("Range")
	if r.Method != http.MethodGet || rng == "" || len(r.Header.Values("Range")) != 1 {
		return 0, 0, false
	}
	if conditional(r) {
		return 0, 0, false
	}
	spec, found := strings.CutPrefix(rng, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found || first == "" {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(first, 10, 64)
	if err != nil || start < 0 || start >= size {
		return 0, 0, false
	}
	end = size - 1
	if last != "" {
		if end, err = strconv.ParseInt(last, 10, 64); err != nil || end < start {
			return 0, 0, false
		}
		end = min(end, size-1)
	}
	return start, end, true
}

func (m *Mirror) headBlobUpstream(w http.ResponseWriter, r *http.Request, req *Request) error {
	ctx, cancel := context.WithTimeout(r.Context(), m.manifestTimeout)
	defer cancel()
	size, err := m.upstream.HeadBlob(ctx, req.Registry, req.Repository, req.Digest)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("Docker-Content-Digest", req.Digest.String())
	w.Header().Set("Accept-Ranges", "bytes")
	w.WriteHeader(http.StatusOK)
	return nil
}

// upstreamSource fetches a whole blob from its upstream registry into the store.
func (m *Mirror) upstreamSource(registry, repo string, d v1.Hash) store.Source {
	return func(ctx context.Context) (io.ReadCloser, int64, error) {
		return m.upstream.Blob(ctx, registry, repo, d, 0, -1)
	}
}

// writeError answers with an OCI error body and a status chosen so that containerd moves on to
// its next host (upstream) whenever the mirror cannot serve: 404 for unknown content, 502/503
// for upstream and local trouble. 401 is never sent: containerd would try to authenticate
// against the mirror instead of falling back. It returns the status sent.
func (m *Mirror) writeError(w http.ResponseWriter, r *http.Request, req *Request, err error) int {
	status, code := classify(err)
	if req != nil && code == "" {
		code = "BLOB_UNKNOWN"
		if req.Kind == KindManifest {
			code = "MANIFEST_UNKNOWN"
		}
	}
	if code == "" {
		code = "UNKNOWN"
	}
	attrs := []any{"method", r.Method, "path", r.URL.Path, "status", status, "error", err}
	if status >= 500 {
		m.log.Warn("cannot serve, runtime will fall back", attrs...)
	} else {
		m.log.Debug("refused", attrs...)
	}
	body, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"code": code, "message": err.Error()}}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return status
}

func classify(err error) (status int, code string) {
	var reqErr *requestError
	switch {
	case errors.As(err, &reqErr):
		return reqErr.status, reqErr.code
	case errors.Is(err, upstream.ErrNotFound):
		return http.StatusNotFound, ""
	case errors.Is(err, upstream.ErrUnauthorized):
		return http.StatusForbidden, "DENIED"
	case errors.Is(err, store.ErrFull):
		return http.StatusServiceUnavailable, "UNAVAILABLE"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, upstream.ErrUnavailable):
		return http.StatusBadGateway, "UNAVAILABLE"
	case errors.Is(err, context.Canceled):
		return statusClientClosed, "UNKNOWN"
	}
	return http.StatusBadGateway, "UNKNOWN"
}

// plainGet reports whether r asks for a whole body with no condition: what containerd sends, and
// what can be answered without http.ServeContent.
func plainGet(r *http.Request) bool {
	return r.Method == http.MethodGet && r.Header.Get("Range") == "" && !conditional(r)
}

// conditional reports whether r carries a condition on the blob's version.
func conditional(r *http.Request) bool {
	for _, h := range []string{"If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range"} {
		if r.Header.Get(h) != "" {
			return true
		}
	}
	return false
}

// streamBuffers are the copy buffers of blobs served while they download.
var streamBuffers = sync.Pool{New: func() any {
	b := make([]byte, 1<<20)
	return &b
}}

// errorRecordingReadSeeker remembers a read error: http.ServeContent swallows it, but the mirror
// must know a body was cut short to count and log it.
type errorRecordingReadSeeker struct {
	rs  io.ReadSeeker
	err error
}

func (e *errorRecordingReadSeeker) Read(p []byte) (int, error) {
	n, err := e.rs.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && e.err == nil {
		e.err = err
	}
	return n, err
}

func (e *errorRecordingReadSeeker) Seek(offset int64, whence int) (int64, error) {
	return e.rs.Seek(offset, whence)
}
