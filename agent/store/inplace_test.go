package store

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// fileSource is a FileSource over a file it fills itself, in steps the test releases.
type fileSource struct {
	path  string
	data  []byte // what it writes
	steps chan int64
	mu    sync.Mutex
	final int64
	fail  error
	close chan struct{}
}

func newFileSource(t *testing.T, dir string, data []byte) *fileSource {
	t.Helper()
	path := filepath.Join(dir, "working")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return &fileSource{path: path, data: data, steps: make(chan int64, 16), close: make(chan struct{})}
}

// put writes the bytes up to end into the file and lets Advance report them.
func (f *fileSource) put(t *testing.T, end int64) {
	t.Helper()
	w, err := os.OpenFile(f.path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	start := f.final
	f.mu.Unlock()
	if _, err := w.WriteAt(f.data[start:end], start); err != nil {
		t.Fatal(err)
	}
	_ = w.Close()
	f.steps <- end
}

func (f *fileSource) FilePath() string { return f.path }

func (f *fileSource) Advance(ctx context.Context, have int64) (int64, error) {
	for {
		f.mu.Lock()
		final, fail := f.final, f.fail
		f.mu.Unlock()
		if final > have {
			return final, nil
		}
		if fail != nil {
			return final, fail
		}
		select {
		case end := <-f.steps:
			f.mu.Lock()
			if end < 0 {
				f.fail = errors.New("source gave up")
			} else {
				f.final = end
			}
			f.mu.Unlock()
		case <-ctx.Done():
			return final, ctx.Err()
		}
	}
}

func (f *fileSource) Read([]byte) (int, error) { return 0, errors.New("a FileSource is not read") }
func (f *fileSource) Close() error {
	select {
	case <-f.close:
	default:
		close(f.close)
	}
	return nil
}

func (f *fileSource) open(context.Context) (io.ReadCloser, int64, error) {
	return f, int64(len(f.data)), nil
}

// TestFetchInPlaceAdoptsTheSourcesFile: a FileSource's bytes reach readers as Advance makes
// them final, the verified file becomes the stored blob (moved, not copied), and no temporary
// file is left behind.
func TestFetchInPlaceAdoptsTheSourcesFile(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	data, d := randomBlob(7, 700<<10)
	src := newFileSource(t, ts.dir, data)
	before, err := os.Stat(src.path)
	if err != nil {
		t.Fatal(err)
	}

	b, err := ts.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	src.put(t, 300<<10)
	head := make([]byte, 300<<10-1) // the last released byte waits for more
	if _, err := io.ReadFull(b, head); err != nil {
		t.Fatalf("read the first bytes while the source is still writing: %v", err)
	}
	if !bytes.Equal(head, data[:len(head)]) {
		t.Fatal("first bytes differ")
	}
	src.put(t, int64(len(data)))
	rest, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(append(head, rest...), data) {
		t.Fatalf("read the whole blob: %v (equal %v)", err, bytes.Equal(append(head, rest...), data))
	}
	ts.wg.Wait()
	if size, err := ts.Stat(d); err != nil || size != int64(len(data)) {
		t.Fatalf("Stat = %d, %v; want %d, nil", size, err, len(data))
	}

	stored, err := os.Stat(ts.blobPath(d.Hex))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, stored) {
		t.Error("the stored blob is a copy, not the source's file")
	}
	if _, err := os.Stat(src.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the source's file is still at its old path (%v)", err)
	}
	if left, _ := os.ReadDir(ts.ingestDir); len(left) != 0 {
		t.Errorf("ingest/ holds %d leftover files", len(left))
	}
	select {
	case <-src.close:
	default:
		t.Error("the source was not closed after commit")
	}
}

// TestFetchInPlaceFailuresLeaveTheSourcesFile: a digest mismatch or a failing source ends the
// download with an error before the last byte, and the store removes nothing of the source's.
func TestFetchInPlaceFailuresLeaveTheSourcesFile(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, src *fileSource)
		want error
	}{
		{"digest mismatch", func(t *testing.T, src *fileSource) {
			src.data = bytes.Clone(src.data)
			src.data[len(src.data)-1] ^= 0xff
			src.put(t, int64(len(src.data)))
		}, ErrDigestMismatch},
		{"source fails", func(t *testing.T, src *fileSource) {
			src.put(t, 100)
			src.steps <- -1
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := openTestStore(t, "")
			ctx := testContext(t)
			data, d := randomBlob(8, 200<<10)
			src := newFileSource(t, ts.dir, data)
			b, err := ts.Fetch(ctx, d, src.open)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			tc.run(t, src)
			got, err := io.ReadAll(b)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("read %d bytes, err %v; want %v", len(got), err, tc.want)
			}
			if len(got) >= len(data) {
				t.Errorf("readers got all %d bytes of a failed download", len(got))
			}
			ts.wg.Wait()
			ts.assertNothingStored(t)
			if _, err := os.Stat(src.path); err != nil {
				t.Errorf("the source's file is gone: %v", err)
			}
		})
	}
}

// committingSource is a fileSource that records what the store tells it as a store.Committer,
// and whether the blob was in the store by then.
type committingSource struct {
	*fileSource
	s       *Store
	d       v1.Hash
	told    chan error
	present bool
}

func (c *committingSource) Committed(err error) {
	_, statErr := c.s.Stat(c.d)
	c.present = statErr == nil
	c.told <- err
}

func (c *committingSource) open(context.Context) (io.ReadCloser, int64, error) {
	return c, int64(len(c.data)), nil
}

// TestFetchInPlaceTellsTheSourceHowItEnded: a FileSource that is a Committer learns once that
// its blob was committed, when Get already finds it there, or that the download failed.
func TestFetchInPlaceTellsTheSourceHowItEnded(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		ts := openTestStore(t, "")
		ctx := testContext(t)
		data, d := randomBlob(9, 300<<10)
		fs := newFileSource(t, ts.dir, data)
		if corrupt {
			_, d = randomBlob(10, 300<<10) // another digest: the bytes will not match
		}
		src := &committingSource{fileSource: fs, s: ts.Store, d: d, told: make(chan error, 2)}
		b, err := ts.Fetch(ctx, d, src.open)
		if err != nil {
			t.Fatal(err)
		}
		src.put(t, int64(len(data)))
		_, _ = io.ReadAll(b)
		_ = b.Close()
		ts.wg.Wait()
		select {
		case err := <-src.told:
			if corrupt && err == nil {
				t.Error("a blob whose digest did not match was reported committed")
			}
			if !corrupt && (err != nil || !src.present) {
				t.Errorf("committed blob: told %v, in the store then: %v; want nil and true", err, src.present)
			}
		default:
			t.Errorf("corrupt=%v: the source was not told how its download ended", corrupt)
		}
		if len(src.told) != 0 {
			t.Error("the source was told twice")
		}
	}
}
