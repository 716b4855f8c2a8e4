package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/oci"
)

// The registry and repository of the mirror's tests.
const (
	testRegistry = "registry.test"
	testRepo     = "app"
)

// testUpstream is upstream.Memory with a gate that can hold blob bodies: a download that has
// started and waits for its bytes.
type testUpstream struct {
	*upstream.Memory
	gate chan struct{} // when set, blob bodies pause after the first half until closed
	// gateFromStart makes the gate hold bodies before their first byte.
	gateFromStart bool
}

func newTestUpstream() *testUpstream { return &testUpstream{Memory: upstream.NewMemory()} }

func (u *testUpstream) addBlob(b []byte) v1.Hash { return u.AddBlob(testRegistry, testRepo, b) }

// addBlobAs serves b as the blob d, whether or not it hashes to d.
func (u *testUpstream) addBlobAs(d v1.Hash, b []byte) { u.AddBlobAs(testRegistry, testRepo, d, b) }

func (u *testUpstream) addManifest(tag string, body []byte) v1.Hash {
	return u.AddManifest(testRegistry, testRepo, tag, body, "")
}

// manifestCalls counts the manifest requests that reached upstream, GET and HEAD.
func (u *testUpstream) manifestCalls() int64 {
	s := u.Stats()
	return s.Manifest + s.HeadManifest
}

func (u *testUpstream) Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error) {
	body, size, err := u.Memory.Blob(ctx, registry, repo, d, offset, length)
	if err != nil || u.gate == nil {
		return body, size, err
	}
	half := size / 2
	if u.gateFromStart {
		half = 0
	}
	gated := io.MultiReader(io.LimitReader(body, half), &gatedReader{ctx: ctx, gate: u.gate, r: body})
	return struct {
		io.Reader
		io.Closer
	}{gated, body}, size, nil
}

type gatedReader struct {
	ctx  context.Context
	gate chan struct{}
	r    io.Reader
}

func (g *gatedReader) Read(p []byte) (int, error) {
	select {
	case <-g.gate:
	case <-g.ctx.Done():
		return 0, g.ctx.Err()
	}
	return g.r.Read(p)
}

func digestOf(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

type testMirror struct {
	server   *httptest.Server
	upstream *testUpstream
	store    *store.Store
	dir      string
	metrics  *prometheus.Registry
}

// requests returns shoal_mirror_requests_total{kind,source,result}.
func (tm *testMirror) requests(t *testing.T, kind, source, result string) float64 {
	t.Helper()
	mfs, err := tm.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "shoal_mirror_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["kind"] == kind && labels["source"] == source && labels["result"] == result {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func newTestMirror(t *testing.T, storeOpts ...store.Option) *testMirror {
	t.Helper()
	return newTestMirrorWith(t, storeOpts, nil)
}

// newTestMirrorWith is newTestMirror with options for the mirror too; wrap, when set, stands
// between the mirror and its store.
func newTestMirrorWith(t *testing.T, storeOpts []store.Option, mirrorOpts []Option, wrap ...func(BlobStore) BlobStore) *testMirror {
	t.Helper()
	dir := t.TempDir()
	s, err := store.Open(filepath.Join(dir, "store"), storeOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	up := newTestUpstream()
	reg := prometheus.NewRegistry()
	var bs BlobStore = s
	for _, w := range wrap {
		bs = w(bs)
	}
	m := New(bs, up, append([]Option{WithDefaultRegistry(testRegistry),
		WithAllowedRegistries(func(r string) bool { return r == testRegistry }), WithRegisterer(reg)}, mirrorOpts...)...)
	server := httptest.NewServer(m)
	t.Cleanup(server.Close)
	return &testMirror{server: server, upstream: up, store: s, dir: dir, metrics: reg}
}

// response is what a test needs of an HTTP answer; the body is already read and closed.
type response struct {
	StatusCode    int
	Header        http.Header
	ContentLength int64
}

// get sends one request to the mirror and reads the answer. It reports every failure as an
// error, so tests may call it from goroutines of their own.
func (tm *testMirror) get(t *testing.T, method, path string, header http.Header) (*response, []byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, tm.server.URL+path, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := tm.server.Client().Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return &response{StatusCode: resp.StatusCode, Header: resp.Header, ContentLength: resp.ContentLength}, body, err
}

// waitStored waits for a served blob to be committed: the store hands out the last byte once it
// is verified and commits (fsync, rename) just after, so readers never wait for the disk.
func (tm *testMirror) waitStored(t *testing.T, d v1.Hash) {
	t.Helper()
	waitStored(t, tm.store, d, 10*time.Second)
}

func waitStored(tb testing.TB, s *store.Store, d v1.Hash, within time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for {
		_, err := s.Stat(d)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s not kept in the store: %v", d, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func blobPath(d v1.Hash) string { return "/v2/app/blobs/" + d.String() + "?ns=registry.test" }

func TestBlobPullThroughThenLocal(t *testing.T) {
	tm := newTestMirror(t)
	content := randomBytes(t, 3<<20+17)
	d := tm.upstream.addBlob(content)

	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
		t.Fatalf("cold GET: status %v err %v, body equal %v", statusOf(resp), err, bytes.Equal(body, content))
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != d.String() {
		t.Errorf("Docker-Content-Digest = %q", got)
	}
	if got := resp.Header.Get("Content-Length"); got != fmt.Sprint(len(content)) {
		t.Errorf("Content-Length = %q, want %d", got, len(content))
	}
	tm.waitStored(t, d)

	resp, body, err = tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
		t.Fatalf("warm GET: status %v err %v", statusOf(resp), err)
	}
	if n := tm.upstream.Stats().Blob; n != 1 {
		t.Errorf("upstream blob calls = %d, want 1 (second GET must be local)", n)
	}

	resp, body, err = tm.get(t, http.MethodGet, blobPath(d), http.Header{"Range": {"bytes=100-199"}})
	if err != nil || resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, content[100:200]) {
		t.Fatalf("warm range GET: status %v err %v len %d", statusOf(resp), err, len(body))
	}
	resp, body, err = tm.get(t, http.MethodHead, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || len(body) != 0 || resp.ContentLength != int64(len(content)) {
		t.Fatalf("warm HEAD: status %v err %v length %d", statusOf(resp), err, resp.ContentLength)
	}
}

func TestColdRangeRequest(t *testing.T) {
	tm := newTestMirror(t)
	content := randomBytes(t, 1<<20)
	d := tm.upstream.addBlob(content)
	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), http.Header{"Range": {"bytes=524288-"}})
	if err != nil || resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, content[524288:]) {
		t.Fatalf("cold range GET: status %v err %v len %d", statusOf(resp), err, len(body))
	}
}

func TestConcurrentColdPullsShareOneUpstreamFetch(t *testing.T) {
	tm := newTestMirror(t)
	content := randomBytes(t, 4<<20)
	d := tm.upstream.addBlob(content)
	tm.upstream.gate = make(chan struct{})

	const clients = 20
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	firstBytes := make(chan struct{}, clients)
	for range clients {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, tm.server.URL+blobPath(d), nil)
			resp, err := tm.server.Client().Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			head := make([]byte, 1024)
			if _, err := io.ReadFull(resp.Body, head); err != nil {
				errs <- err
				return
			}
			firstBytes <- struct{}{} // got bytes while upstream is still paused mid-blob
			rest, err := io.ReadAll(resp.Body)
			if err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(append(head, rest...), content) {
				errs <- errors.New("client received wrong bytes")
			}
		})
	}
	for range clients {
		select {
		case <-firstBytes:
		case err := <-errs:
			t.Fatalf("client failed before the upstream finished: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("clients got no bytes while the download was in flight")
		}
	}
	close(tm.upstream.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := tm.upstream.Stats().Blob; n != 1 {
		t.Errorf("upstream blob calls = %d, want 1", n)
	}
}

func TestCorruptUpstreamBlobIsNeverServedComplete(t *testing.T) {
	tm := newTestMirror(t)
	content := randomBytes(t, 2<<20)
	d := digestOf(content)
	corrupted := bytes.Clone(content)
	corrupted[len(corrupted)/2] ^= 0xff
	tm.upstream.addBlobAs(d, corrupted)

	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err == nil && resp.StatusCode == http.StatusOK && len(body) == len(content) {
		t.Fatalf("a corrupted blob was served complete (%d bytes)", len(body))
	}
	if _, err := tm.store.Stat(d); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("corrupted blob is in the store: %v", err)
	}
	// The request is counted once its handler has returned, which may be just after the
	// client saw the cut. It is aborted when the headers went out before the mismatch was
	// found, and an error (a 5xx, nothing sent) when the store found it first, as on a machine
	// slow enough that the whole blob arrived before the handler started streaming it: either
	// way once, and never complete.
	aborted := map[[3]string]float64{{"blob", sourceUpstream, resultAborted}: 1}
	refused := map[[3]string]float64{{"blob", sourceUpstream, resultError}: 1}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		got := fmt.Sprint(tm.requestSeries(t))
		if got == fmt.Sprint(aborted) || got == fmt.Sprint(refused) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("requests_total = %s, want %v or %v", got, aborted, refused)
		}
	}
	// Once upstream is fixed, the next pull gets the right bytes.
	tm.upstream.addBlob(content)
	resp, body, err = tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
		t.Fatalf("GET after fix: status %v err %v", statusOf(resp), err)
	}
}

func TestManifests(t *testing.T) {
	tm := newTestMirror(t)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	d := tm.upstream.addManifest("v1", manifest)

	for i := range 2 {
		resp, body, err := tm.get(t, http.MethodGet, "/v2/app/manifests/v1?ns=registry.test", nil)
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, manifest) {
			t.Fatalf("GET by tag #%d: status %v err %v", i, statusOf(resp), err)
		}
		if ct := resp.Header.Get("Content-Type"); ct != oci.MediaTypeOCIManifest {
			t.Errorf("Content-Type = %q", ct)
		}
		if got := resp.Header.Get("Docker-Content-Digest"); got != d.String() {
			t.Errorf("Docker-Content-Digest = %q, want %s", got, d)
		}
	}
	if n := tm.upstream.manifestCalls(); n != 2 {
		t.Errorf("tags must be resolved upstream every time: %d upstream calls, want 2", n)
	}
	tm.waitStored(t, d)
	resp, body, err := tm.get(t, http.MethodGet, "/v2/app/manifests/"+d.String()+"?ns=registry.test", nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, manifest) {
		t.Fatalf("GET by digest: status %v err %v", statusOf(resp), err)
	}
	if n := tm.upstream.manifestCalls(); n != 2 {
		t.Errorf("manifest by digest went upstream (%d calls), want it served from the store", n)
	}
	resp, _, err = tm.get(t, http.MethodHead, "/v2/app/manifests/v1?ns=registry.test", nil)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD by tag: status %v err %v", statusOf(resp), err)
	}
}

func TestFailFastStatuses(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		status int
	}{
		{"unavailable", fmt.Errorf("dial: %w", upstream.ErrUnavailable), http.StatusBadGateway},
		{"unauthorized", fmt.Errorf("token: %w", upstream.ErrUnauthorized), http.StatusForbidden},
		{"not found", fmt.Errorf("x: %w", upstream.ErrNotFound), http.StatusNotFound},
		{"timeout", context.DeadlineExceeded, http.StatusBadGateway},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tm := newTestMirror(t)
			tm.upstream.SetFailure(tt.err)
			d := digestOf([]byte(tt.name))
			for _, path := range []string{blobPath(d), "/v2/app/manifests/latest?ns=registry.test"} {
				resp, body, err := tm.get(t, http.MethodGet, path, nil)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tt.status {
					t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, tt.status)
				}
				if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusTooManyRequests {
					t.Errorf("status %d would stop containerd from falling back", resp.StatusCode)
				}
				assertOCIError(t, body)
			}
		})
	}
}

func TestStoreFullFallsBack(t *testing.T) {
	tm := newTestMirror(t, store.WithMaxBytes(1<<20))
	d := tm.upstream.addBlob(randomBytes(t, 2<<20))
	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("blob larger than the store: status %d, want 503", resp.StatusCode)
	}
	assertOCIError(t, body)
}

func TestRegistryNotMirrored(t *testing.T) {
	tm := newTestMirror(t)
	d := tm.upstream.addBlob([]byte("x"))
	resp, body, err := tm.get(t, http.MethodGet, "/v2/app/blobs/"+d.String()+"?ns=other.test", nil)
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("status %v err %v, want 404", statusOf(resp), err)
	}
	assertOCIError(t, body)
	if n := tm.upstream.Stats().Blob; n != 0 {
		t.Errorf("an unmirrored registry was contacted %d times", n)
	}
}

// TestBadInputTouchesNothing sends hostile requests and checks each gets a 4xx OCI error and
// that the mirror neither calls upstream nor creates any file.
func TestBadInputTouchesNothing(t *testing.T) {
	tm := newTestMirror(t)
	before := listFiles(t, tm.dir)
	paths := []string{
		"/v2/../../etc/passwd/blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/app/blobs/sha256:..%2F..%2Fetc%2Fpasswd",
		"/v2/app%2F..%2F..%2Fx/blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/app/blobs/md5:abc",
		"/v2/app/blobs/sha256:" + strings.Repeat("A", 64),
		"/v2/app/manifests/" + strings.Repeat("x", 200),
		"/v2/" + strings.Repeat("abc/", 300) + "blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/app/blobs/sha256:" + strings.Repeat("a", 64) + "?ns=../../x",
	}
	for _, p := range paths {
		resp, body, err := tm.get(t, http.MethodGet, p, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode < 400 || resp.StatusCode > 499 {
			t.Errorf("GET %s = %d, want 4xx", p, resp.StatusCode)
		}
		assertOCIError(t, body)
	}
	for _, method := range []string{http.MethodPut, http.MethodPost, http.MethodDelete, http.MethodPatch} {
		resp, _, err := tm.get(t, method, blobPath(digestOf([]byte("x"))), nil)
		if err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s = %v %v, want 405", method, statusOf(resp), err)
		}
	}
	if n := tm.upstream.Stats().Blob + tm.upstream.manifestCalls(); n != 0 {
		t.Errorf("bad requests reached upstream %d times", n)
	}
	if after := listFiles(t, tm.dir); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Errorf("files changed: before %v after %v", before, after)
	}
}

// TestMalformedTagIsUnknown: a manifest asked for by a malformed tag is answered 404
// MANIFEST_UNKNOWN, as the Distribution spec wants for a manifest that does not exist, by the
// mirror itself; a malformed digest stays a 400.
func TestMalformedTagIsUnknown(t *testing.T) {
	tm := newTestMirror(t)
	tests := []struct {
		method, path string
		status       int
		code         string
	}{
		{http.MethodGet, "/v2/app/manifests/.INVALID_MANIFEST_NAME", http.StatusNotFound, "MANIFEST_UNKNOWN"},
		{http.MethodHead, "/v2/app/manifests/.INVALID_MANIFEST_NAME?ns=registry.test", http.StatusNotFound, ""},
		{http.MethodGet, "/v2/app/manifests/-bad?ns=registry.test", http.StatusNotFound, "MANIFEST_UNKNOWN"},
		{http.MethodGet, "/v2/app/manifests/sha256:totallywrong", http.StatusBadRequest, "DIGEST_INVALID"},
	}
	for _, tt := range tests {
		resp, body, err := tm.get(t, tt.method, tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != tt.status {
			t.Errorf("%s %s = %d, want %d", tt.method, tt.path, resp.StatusCode, tt.status)
		}
		if tt.code == "" {
			continue // HEAD: no body
		}
		var e struct {
			Errors []struct{ Code string } `json:"errors"`
		}
		if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 || e.Errors[0].Code != tt.code {
			t.Errorf("%s %s: body %q, want one %s error", tt.method, tt.path, body, tt.code)
		}
	}
	if n := tm.upstream.manifestCalls(); n != 0 {
		t.Errorf("malformed references reached upstream %d times", n)
	}
}

func TestBaseEndpoint(t *testing.T) {
	tm := newTestMirror(t)
	resp, body, err := tm.get(t, http.MethodGet, "/v2/", nil)
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "{}" {
		t.Fatalf("GET /v2/: %v %v %q", statusOf(resp), err, body)
	}
	if resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Error("missing Docker-Distribution-API-Version")
	}
}

func assertOCIError(t *testing.T, body []byte) {
	t.Helper()
	var e struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) == 0 || e.Errors[0].Code == "" {
		t.Errorf("not an OCI error body: %q", body)
	}
}

func listFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Name() == ".lock" || d.Name() == "LOCK" {
			return nil
		}
		files = append(files, strings.TrimPrefix(p, dir))
		return nil
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	sort.Strings(files)
	return files
}

func statusOf(resp *response) any {
	if resp == nil {
		return "no response"
	}
	return resp.StatusCode
}
