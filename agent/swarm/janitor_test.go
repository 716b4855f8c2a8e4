package swarm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-dev/shoal/agent/store"
)

// heldBlobs is a content store that holds one blob once told to.
type heldBlobs struct {
	d    v1.Hash
	data []byte
	held atomic.Bool
}

func (h *heldBlobs) Get(d v1.Hash) (store.Blob, error) {
	if d != h.d || !h.held.Load() {
		return nil, store.ErrNotFound
	}
	return bytesBlob{bytes.NewReader(h.data)}, nil
}

type bytesBlob struct{ *bytes.Reader }

func (b bytesBlob) Close() error { return nil }

// deliver reads a source to its end as the content store would, then commits it to held and
// tells the source (store.Committer), as the store does once the blob is verified.
func deliver(ctx context.Context, src store.Source, held *heldBlobs) ([]byte, error) {
	rc, _, err := src(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		return got, err
	}
	held.held.Store(true)
	if c, ok := rc.(store.Committer); ok {
		c.Committed(nil)
	}
	return got, nil
}

// blobOf returns node's swarm state of d, or nil.
func blobOf(node *testNode, d v1.Hash) *blob {
	node.swarm.mu.Lock()
	defer node.swarm.mu.Unlock()
	return node.swarm.blobs[d.Hex]
}

// A delivered blob keeps seeding while its torrents move bytes, and is retired, its torrents
// stopped, once they have been still for the idle timeout.
func TestJanitorRetiresIdleDeliveredBlob(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 3<<20+17)
	d := up.add(content)
	locals := []*heldBlobs{{d: d, data: content}, {d: d, data: content}}
	nodes := startNodes(t, 2, up, func(i int) LocalBlobs { return locals[i] })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, node := range nodes {
		got, err := deliver(ctx, node.swarm.Source("registry.test", "app", d), locals[i])
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("node %d: %d bytes, %v", i, len(got), err)
		}
	}
	for i, node := range nodes {
		b := blobOf(node, d)
		for !delivered(node.swarm, b) {
			select {
			case <-ctx.Done():
				t.Fatalf("node %d never handed the blob over", i)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}

	s := nodes[0].swarm
	waitQuiet(ctx, t, blobOf(nodes[0], d)) // no late chunk still in flight between the nodes
	idle := s.cfg.IdleTimeout
	start := time.Now()
	s.sweep(start) // first look: the blob becomes quiet from here
	s.sweep(start.Add(idle - time.Second))
	if blobOf(nodes[0], d) == nil {
		t.Fatal("blob retired before the idle timeout")
	}
	s.sweep(start.Add(idle))
	if blobOf(nodes[0], d) != nil {
		t.Fatal("idle delivered blob not retired")
	}
	if n := s.client.Stats().Torrents; n != 0 {
		t.Errorf("%d torrents left after retiring the only blob", n)
	}
	if got := testutil.ToFloat64(s.metrics.retired.WithLabelValues(retiredDelivered)); got != 1 {
		t.Errorf("retired{delivered} = %v, want 1", got)
	}
	// Retiring does not touch the content store's copy, and the node still serves the blob.
	got, err := readSource(ctx, s.Source("registry.test", "app", d))
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read after retiring: %d bytes, %v", len(got), err)
	}
}

// A blob with a reader is never retired; once the reader is gone and the torrents are still for
// the idle timeout, the blob is retired and its working file removed.
func TestJanitorRetiresAbandonedDownload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	node, d, rc := openOnOneNode(ctx, t, 2<<20)
	s := node.swarm
	if _, err := io.ReadFull(rc, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	b := blobOf(node, d)
	path := b.path
	// Let the torrents finish what they download in the background, so that only the reader
	// keeps the blob in use.
	waitQuiet(ctx, t, b)

	idle := s.cfg.IdleTimeout
	start := time.Now()
	for i := range 3 {
		s.sweep(start.Add(time.Duration(i) * idle))
	}
	if blobOf(node, d) == nil {
		t.Fatal("blob retired while a reader had it open")
	}
	if err := rc.Close(); err != nil {
		t.Fatal(err)
	}
	later := start.Add(3 * idle)
	s.sweep(later)
	if blobOf(node, d) == nil {
		t.Fatal("blob retired at the first sweep after its reader went away")
	}
	s.sweep(later.Add(idle))
	if blobOf(node, d) != nil {
		t.Fatal("abandoned blob not retired")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("working file of the retired blob: %v, want it removed", err)
	}
	if got := testutil.ToFloat64(s.metrics.retired.WithLabelValues(retiredUndelivered)); got != 1 {
		t.Errorf("retired{undelivered} = %v, want 1", got)
	}
}

// openOnOneNode starts one node and opens a reader of a new random blob of size bytes on it.
func openOnOneNode(ctx context.Context, t *testing.T, size int) (*testNode, v1.Hash, io.ReadCloser) {
	t.Helper()
	up := newMemUpstream()
	d := up.add(randomBlob(t, size))
	node := startNodes(t, 1, up)[0]
	rc, _, err := node.swarm.Source("registry.test", "app", d)(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return node, d, rc
}

// waitQuiet waits until b's torrents stop moving bytes.
func waitQuiet(ctx context.Context, t *testing.T, b *blob) {
	t.Helper()
	var last int64 = -1
	for {
		moved := b.bytesMoved()
		if moved == last {
			return
		}
		last = moved
		select {
		case <-ctx.Done():
			t.Fatal("torrents never went quiet")
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Files in the swarm's directory that no blob uses are removed once they are old; anything else
// is left alone.
func TestJanitorRemovesUnusedWorkingFiles(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	node, d, rc := openOnOneNode(ctx, t, 1<<20)
	defer rc.Close()
	s := node.swarm
	inUse := blobOf(node, d).path

	now := time.Now()
	old := now.Add(-2 * s.cfg.IdleTimeout)
	write := func(name string, mtime time.Time) string {
		path := filepath.Join(s.cfg.Dir, name)
		if err := os.WriteFile(path, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return path
	}
	stale := write(strings.Repeat("ab", 32), old)
	fresh := write(strings.Repeat("cd", 32), now)
	other := write("notes.txt", old)
	upper := write(strings.Repeat("AB", 32), old)
	if err := os.Chtimes(inUse, old, old); err != nil {
		t.Fatal(err)
	}

	s.removeUnusedFiles(now)
	for _, c := range []struct {
		path string
		kept bool
	}{{stale, false}, {fresh, true}, {other, true}, {upper, true}, {inUse, true}} {
		_, err := os.Stat(c.path)
		if kept := err == nil; kept != c.kept {
			t.Errorf("%s: kept = %v (%v), want %v", filepath.Base(c.path), kept, err, c.kept)
		}
	}
	if got := testutil.ToFloat64(s.metrics.filesRemoved); got != 1 {
		t.Errorf("working_files_removed_total = %v, want 1", got)
	}
}

// delivered reports whether b was handed over to the content store.
func delivered(s *Swarm, b *blob) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return b.path == ""
}
