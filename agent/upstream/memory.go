package upstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-dev/shoal/internal/oci"
)

// Memory is an upstream registry held in memory: the fake that stands beside Client, for tests
// of what uses one (the mirror, the swarm). It serves the manifests and blobs added to it, by
// registry and repository, under Client's contract: the same methods, the same *Error values
// matching the same Err* kinds, the same range semantics. upstreamtest's conformance suite
// holds both to that contract. It is safe for concurrent use.
type Memory struct {
	mu          sync.Mutex
	repos       map[memoryRepo]*memoryContent
	ignoreRange bool
	failure     error

	manifestCalls, headManifestCalls, blobCalls, headBlobCalls atomic.Int64
	blobBytes                                                  atomic.Int64
}

type memoryRepo struct{ registry, repo string }

type memoryContent struct {
	manifests map[string]memoryManifest // by tag and by digest
	blobs     map[v1.Hash][]byte
}

type memoryManifest struct {
	body      []byte
	mediaType string
}

// NewMemory returns an empty Memory.
func NewMemory() *Memory { return &Memory{repos: map[memoryRepo]*memoryContent{}} }

// MemoryStats counts what a Memory was asked: calls of each method, failed ones included, and
// the blob bytes its callers read.
type MemoryStats struct {
	Manifest, HeadManifest, Blob, HeadBlob int64
	// BlobBytes is how many bytes were read from the bodies Blob returned.
	BlobBytes int64
}

// Stats returns the counts so far.
func (m *Memory) Stats() MemoryStats {
	return MemoryStats{
		Manifest: m.manifestCalls.Load(), HeadManifest: m.headManifestCalls.Load(),
		Blob: m.blobCalls.Load(), HeadBlob: m.headBlobCalls.Load(),
		BlobBytes: m.blobBytes.Load(),
	}
}

// AddBlob serves content as a blob of registry/repo and returns its digest.
func (m *Memory) AddBlob(registry, repo string, content []byte) v1.Hash {
	d := sha256Of(content)
	m.AddBlobAs(registry, repo, d, content)
	return d
}

// AddBlobAs serves content as the blob d of registry/repo whether or not it hashes to d, as a
// registry serving corrupt data would: Client does not verify blobs (the store does), and
// neither does Memory.
func (m *Memory) AddBlobAs(registry, repo string, d v1.Hash, content []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.content(registry, repo).blobs[d] = bytes.Clone(content)
}

// AddManifest serves body as a manifest of registry/repo by its digest and, when tag is not "",
// by tag, and returns its digest. mediaType "" takes the type the body declares.
func (m *Memory) AddManifest(registry, repo, tag string, body []byte, mediaType string) v1.Hash {
	d := sha256Of(body)
	m.AddManifestAs(registry, repo, d.String(), body, mediaType)
	if tag != "" {
		m.AddManifestAs(registry, repo, tag, body, mediaType)
	}
	return d
}

// AddManifestAs serves body as the manifest reference (a tag or a digest) of registry/repo,
// whether or not it hashes to a digest reference, as a registry serving a tampered manifest
// would; Manifest refuses such a body with ErrInvalid, as Client does.
func (m *Memory) AddManifestAs(registry, repo, reference string, body []byte, mediaType string) {
	if mediaType == "" {
		mediaType = oci.ManifestMediaType(body)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.content(registry, repo).manifests[reference] = memoryManifest{body: bytes.Clone(body), mediaType: mediaType}
}

// content returns registry/repo's content, created empty if need be; m.mu is held.
func (m *Memory) content(registry, repo string) *memoryContent {
	key := memoryRepo{registry, repo}
	c := m.repos[key]
	if c == nil {
		c = &memoryContent{manifests: map[string]memoryManifest{}, blobs: map[v1.Hash][]byte{}}
		m.repos[key] = c
	}
	return c
}

// SetIgnoreRange makes Memory answer as a registry that ignores Range: a ranged Blob (offset > 0
// or length > 0) fails with ErrRangeUnsupported.
func (m *Memory) SetIgnoreRange(ignore bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ignoreRange = ignore
}

// SetFailure makes every call fail with err, in an *Error that wraps it (nil: none): a registry
// that is down is fmt.Errorf("...: %w", ErrUnavailable), one that refuses the credentials
// ErrUnauthorized.
func (m *Memory) SetFailure(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failure = err
}

// Manifest returns the manifest reference of registry/repo. It checks what Client checks: a
// manifest asked for by digest must hash to it (ErrInvalid), and one whose media type accept
// does not list is not found (ErrNotFound), as Distribution answers for OCI manifests and
// indexes; accept nil means every manifest type, "*/*" anything.
func (m *Memory) Manifest(ctx context.Context, registry, repo, reference string, accept []string) (*Manifest, error) {
	m.manifestCalls.Add(1)
	op := "get manifest " + refString(repo, reference)
	man, err := m.manifest(ctx, op, registry, repo, reference, accept)
	if err != nil {
		return nil, err
	}
	digest := sha256Of(man.body)
	if oci.IsDigest(reference) && digest.String() != reference {
		return nil, &Error{Registry: registry, Op: op, StatusCode: http.StatusOK, kind: ErrInvalid,
			Err: fmt.Errorf("body hashes to %s, not to the requested digest", digest)}
	}
	return &Manifest{Body: bytes.Clone(man.body), MediaType: man.mediaType, Digest: digest}, nil
}

// HeadManifest returns the descriptor of the manifest reference of registry/repo: what Manifest
// returns, with the digest asked for when reference is one (a HEAD has no body to hash).
func (m *Memory) HeadManifest(ctx context.Context, registry, repo, reference string, accept []string) (v1.Descriptor, error) {
	m.headManifestCalls.Add(1)
	man, err := m.manifest(ctx, "head manifest "+refString(repo, reference), registry, repo, reference, accept)
	if err != nil {
		return v1.Descriptor{}, err
	}
	digest := sha256Of(man.body)
	if oci.IsDigest(reference) {
		digest, _ = v1.NewHash(reference) // validated by manifest
	}
	return v1.Descriptor{MediaType: types.MediaType(man.mediaType), Size: int64(len(man.body)), Digest: digest}, nil
}

func (m *Memory) manifest(ctx context.Context, op, registry, repo, reference string, accept []string) (memoryManifest, error) {
	fail := func(status int, code string, kind, err error) (memoryManifest, error) {
		return memoryManifest{}, &Error{Registry: registry, Op: op, StatusCode: status, Code: code, Err: err, kind: kind}
	}
	if err := validate(registry, repo); err != nil {
		return fail(0, "", ErrBadRequest, err)
	}
	var err error
	if oci.IsDigest(reference) {
		_, err = oci.ParseDigest(reference)
	} else {
		err = oci.ValidateTag(reference)
	}
	if err != nil {
		return fail(0, "", ErrBadRequest, err)
	}
	if err, kind := m.unusable(ctx); err != nil {
		return fail(0, "", kind, err)
	}
	m.mu.Lock()
	man, ok := m.content(registry, repo).manifests[reference]
	m.mu.Unlock()
	if !ok {
		return fail(http.StatusNotFound, "MANIFEST_UNKNOWN", ErrNotFound, errors.New("manifest unknown"))
	}
	if !accepts(accept, man.mediaType) {
		return fail(http.StatusNotFound, "MANIFEST_UNKNOWN", ErrNotFound,
			fmt.Errorf("a %s found, but the Accept list does not have it", man.mediaType))
	}
	return man, nil
}

// accepts reports whether an Accept list (nil: the usual manifest types) takes mediaType.
func accepts(accept []string, mediaType string) bool {
	if mediaType == "" {
		return true // nothing to go by
	}
	if len(accept) == 0 {
		accept = oci.ManifestMediaTypes
	}
	for _, a := range accept {
		for entry := range strings.SplitSeq(a, ",") {
			mt, _, err := mime.ParseMediaType(strings.TrimSpace(entry))
			if err == nil && (mt == mediaType || mt == "*/*") {
				return true
			}
		}
	}
	return false
}

// Blob opens bytes [offset, offset+length) of blob d of registry/repo (length -1: to the end)
// and returns them with the blob's size, with Client's semantics: length 0 is a HEAD; a range
// is cut at the blob's end; a range starting at or past the end fails with ErrBadRequest, as a
// registry's 416 does; a ranged request to a Memory that ignores Range fails with
// ErrRangeUnsupported. Reading the body fails once ctx is done.
func (m *Memory) Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error) {
	m.blobCalls.Add(1)
	op := "get blob " + repo + "@" + d.String()
	if offset < 0 || length < -1 {
		return nil, 0, &Error{Registry: registry, Op: op, Err: fmt.Errorf("bad range: offset %d, length %d", offset, length), kind: ErrBadRequest}
	}
	if length == 0 {
		size, err := m.HeadBlob(ctx, registry, repo, d)
		if err != nil {
			return nil, 0, err
		}
		return io.NopCloser(strings.NewReader("")), size, nil
	}
	ranged := offset > 0 || length > 0
	if ranged {
		op = rangeOp(op, offset, length)
	}
	content, err := m.blob(ctx, op, registry, repo, d)
	if err != nil {
		return nil, 0, err
	}
	size := int64(len(content))
	m.mu.Lock()
	ignoreRange := m.ignoreRange
	m.mu.Unlock()
	switch {
	case ranged && ignoreRange:
		return nil, 0, &Error{Registry: registry, Op: op, StatusCode: http.StatusOK, Err: errors.New("asked for a range, got the whole blob"), kind: ErrRangeUnsupported}
	case ranged && offset >= size:
		return nil, 0, &Error{Registry: registry, Op: op, StatusCode: http.StatusRequestedRangeNotSatisfiable, Err: errors.New(http.StatusText(http.StatusRequestedRangeNotSatisfiable)), kind: ErrBadRequest}
	}
	end := size
	if length > 0 {
		end = min(offset+length, size)
	}
	body := &memoryBody{ctx: ctx, r: bytes.NewReader(content[offset:end]), read: &m.blobBytes,
		fail: func(err error) error {
			return &Error{Registry: registry, Op: op + ": read body", StatusCode: http.StatusOK, Err: err, kind: failureKind(err)}
		}}
	return body, size, nil
}

// HeadBlob returns the size of blob d of registry/repo.
func (m *Memory) HeadBlob(ctx context.Context, registry, repo string, d v1.Hash) (int64, error) {
	m.headBlobCalls.Add(1)
	content, err := m.blob(ctx, "head blob "+repo+"@"+d.String(), registry, repo, d)
	if err != nil {
		return 0, err
	}
	return int64(len(content)), nil
}

func (m *Memory) blob(ctx context.Context, op, registry, repo string, d v1.Hash) ([]byte, error) {
	fail := func(status int, code string, kind, err error) ([]byte, error) {
		return nil, &Error{Registry: registry, Op: op, StatusCode: status, Code: code, Err: err, kind: kind}
	}
	if err := validate(registry, repo); err != nil {
		return fail(0, "", ErrBadRequest, err)
	}
	if _, err := oci.ParseDigest(d.String()); err != nil {
		return fail(0, "", ErrBadRequest, err)
	}
	if err, kind := m.unusable(ctx); err != nil {
		return fail(0, "", kind, err)
	}
	m.mu.Lock()
	content, ok := m.content(registry, repo).blobs[d]
	m.mu.Unlock()
	if !ok {
		return fail(http.StatusNotFound, "BLOB_UNKNOWN", ErrNotFound, errors.New("blob unknown to registry"))
	}
	return content, nil
}

// unusable returns why no call can be answered now, and its kind: the caller gave up (the kind
// Client gives it), or SetFailure (its own kind, through Unwrap).
func (m *Memory) unusable(ctx context.Context) (err, kind error) {
	if err := ctx.Err(); err != nil {
		return err, failureKind(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.failure, nil
}

// validate checks a registry and repository name as Client does before sending anything.
func validate(registry, repo string) error {
	if err := oci.ValidateRegistry(registry); err != nil {
		return err
	}
	return oci.ValidateRepository(repo)
}

// memoryBody is a blob body of a Memory: it counts the bytes read and fails once its context
// is done, as a body streaming from a registry does.
type memoryBody struct {
	ctx  context.Context
	r    *bytes.Reader
	read *atomic.Int64
	fail func(error) error
}

func (b *memoryBody) Read(p []byte) (int, error) {
	if err := b.ctx.Err(); err != nil {
		return 0, b.fail(err)
	}
	n, err := b.r.Read(p)
	b.read.Add(int64(n))
	return n, err
}

func (b *memoryBody) Close() error { return nil }

func sha256Of(b []byte) v1.Hash {
	d, _ := digestOf(b, "sha256")
	return d
}
