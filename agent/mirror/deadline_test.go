package mirror

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
)

// wedgedStore blocks every call until released, ignoring the caller's context, as a deadlock
// inside the store would.
type wedgedStore struct {
	BlobStore
	release chan struct{}
	once    sync.Once
}

func (w *wedgedStore) wait() { <-w.release }

func (w *wedgedStore) unwedge() { w.once.Do(func() { close(w.release) }) }

func (w *wedgedStore) Get(d v1.Hash) (store.Blob, error) {
	w.wait()
	return w.BlobStore.Get(d)
}

func (w *wedgedStore) Fetch(ctx context.Context, d v1.Hash, src store.Source) (store.Blob, error) {
	w.wait()
	return w.BlobStore.Fetch(ctx, d, src)
}

func (tm *testMirror) deadlines(t *testing.T, which string) float64 {
	t.Helper()
	mfs, err := tm.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "shoal_mirror_deadline_exceeded_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "deadline" && l.GetValue() == which {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric shoal_mirror_deadline_exceeded_total{deadline=%q} not exposed", which)
	return 0
}

// TestWedgedStoreIsAnsweredWith503 has the store deadlocked (it ignores the request's context):
// the mirror still answers, with 503 so that containerd goes to its next host, and counts it.
func TestWedgedStoreIsAnsweredWith503(t *testing.T) {
	w := &wedgedStore{release: make(chan struct{})}
	tm := newTestMirrorWith(t, nil, []Option{WithFirstByteTimeout(200 * time.Millisecond)},
		func(bs BlobStore) BlobStore { w.BlobStore = bs; return w })
	t.Cleanup(w.unwedge)
	d := tm.upstream.addBlob(randomBytes(t, 64<<10))
	for _, method := range []string{http.MethodGet, http.MethodHead} {
		resp, _, err := tm.get(t, method, blobPath(d), nil)
		if err != nil {
			t.Fatalf("%s with the store wedged: %v", method, err)
		}
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("%s with the store wedged: status %d, want 503", method, resp.StatusCode)
		}
	}
	if got := tm.deadlines(t, deadlineFirstByte); got != 2 {
		t.Errorf("first-byte deadlines counted %v, want 2", got)
	}
	// Counted by the watch as it answers: the wedged work never will.
	if got := tm.requests(t, "blob", sourceNone, resultError); got != 2 {
		t.Errorf("requests{blob,none,error} = %v, want 2", got)
	}
	// Once the store is back, the same mirror serves again.
	w.unwedge()
	content := randomBytes(t, 32<<10)
	d = tm.upstream.addBlob(content)
	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
		t.Fatalf("after the wedge: status %v err %v", statusOf(resp), err)
	}
}

// TestSlowFirstBytesStillServe has a download start (its source answered) whose first byte
// comes only after the first-byte timeout, as in a busy rollout: the answer is the blob, not 503.
func TestSlowFirstBytesStillServe(t *testing.T) {
	tm := newTestMirrorWith(t, nil, []Option{WithFirstByteTimeout(200 * time.Millisecond)})
	content := randomBytes(t, 64<<10)
	d := tm.upstream.addBlob(content)
	tm.upstream.gate = make(chan struct{})
	tm.upstream.gateFromStart = true
	time.AfterFunc(600*time.Millisecond, func() { close(tm.upstream.gate) })
	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
		t.Fatalf("status %v err %v, %d bytes; want 200 and the blob", statusOf(resp), err, len(body))
	}
	if got := tm.deadlines(t, deadlineFirstByte); got != 0 {
		t.Errorf("first-byte deadlines counted %v for a download that had started, want 0", got)
	}
	tm.waitRequests(t, "after a slow download", map[[3]string]float64{{"blob", sourceUpstream, resultOK}: 1})
}

// TestSilentBodyIsCut has a download stop after half the blob: the mirror cuts the connection
// once the body has been silent for the body-idle timeout, so the client sees a short body and
// retries, instead of waiting for ever.
func TestSilentBodyIsCut(t *testing.T) {
	tm := newTestMirrorWith(t, []store.Option{store.WithStallTimeout(time.Hour)},
		[]Option{WithBodyIdleTimeout(300 * time.Millisecond)})
	content := randomBytes(t, 256<<10)
	d := tm.upstream.addBlob(content)
	tm.upstream.gate = make(chan struct{})
	defer close(tm.upstream.gate)
	resp, body, err := tm.get(t, http.MethodGet, blobPath(d), nil)
	if err == nil {
		t.Fatalf("a body that went silent was not cut: status %v, %d bytes", statusOf(resp), len(body))
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("want the body cut short (unexpected EOF), got %v", err)
	}
	if resp.StatusCode != http.StatusOK || len(body) == 0 || !bytes.Equal(body, content[:len(body)]) {
		t.Fatalf("status %d, %d bytes before the cut; want 200 and a correct prefix", resp.StatusCode, len(body))
	}
	if got := tm.deadlines(t, deadlineBodyIdle); got != 1 {
		t.Errorf("body-idle deadlines counted %v, want 1", got)
	}
	if got := tm.requests(t, "blob", sourceUpstream, resultAborted); got != 1 {
		t.Errorf("requests{blob,upstream,aborted} = %v, want 1: the watch counts the body it cut", got)
	}
}

// TestRangeOnBlobStillDownloading asks for the second half of a blob whose download is held
// before it: the answer is a 206 of exactly those bytes, sent as they arrive.
func TestRangeOnBlobStillDownloading(t *testing.T) {
	tm := newTestMirror(t)
	content := randomBytes(t, 1<<20)
	d := tm.upstream.addBlob(content)
	tm.upstream.gate = make(chan struct{})
	// Start the download with a plain GET that receives the first half.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, tm.server.URL+blobPath(d), nil)
	first, err := tm.server.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Body.Close()
	if _, err := io.ReadFull(first.Body, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	type result struct {
		resp *response
		body []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, body, err := tm.get(t, http.MethodGet, blobPath(d), http.Header{"Range": {"bytes=700000-"}})
		done <- result{resp, body, err}
	}()
	time.Sleep(100 * time.Millisecond) // the range request is waiting for bytes not there yet
	close(tm.upstream.gate)
	res := <-done
	if res.err != nil || res.resp.StatusCode != http.StatusPartialContent || !bytes.Equal(res.body, content[700000:]) {
		t.Fatalf("range on a blob still downloading: status %v err %v, %d bytes", statusOf(res.resp), res.err, len(res.body))
	}
	if cr := res.resp.Header.Get("Content-Range"); cr != "bytes 700000-1048575/1048576" {
		t.Errorf("Content-Range %q", cr)
	}
}
