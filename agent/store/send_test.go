package store

import (
	"bytes"
	"errors"
	"io"
	"os"
	"syscall"
	"testing"
	"time"
)

// fileTaker is a writer that takes file sections as net/http's response on a TCP connection does
// (io.ReaderFrom, sendfile for an io.LimitedReader over a file), and records what it was handed.
type fileTaker struct {
	got         chan []byte // each section's bytes, as it arrives
	filesHanded int         // sections that were an io.LimitedReader over a syscall.Conn
	otherHanded int         // sections of any other kind
}

func (f *fileTaker) Write(p []byte) (int, error) {
	f.otherHanded++
	f.got <- bytes.Clone(p)
	return len(p), nil
}

func (f *fileTaker) ReadFrom(r io.Reader) (int64, error) {
	if lr, ok := r.(*io.LimitedReader); ok {
		if _, ok := lr.R.(syscall.Conn); ok {
			f.filesHanded++
		} else {
			f.otherHanded++
		}
	} else {
		f.otherHanded++
	}
	p, err := io.ReadAll(r)
	f.got <- p
	return int64(len(p)), err
}

// sendingBlob starts fetching a random blob of size bytes from a fileSource that writes nothing
// until the test puts it, and returns the blob as a Sender.
func sendingBlob(t *testing.T, seed uint64, size int) (*testStore, *fileSource, []byte, Sender) {
	t.Helper()
	ts := openTestStore(t, "")
	data, d := randomBlob(seed, size)
	src := newFileSource(t, ts.dir, data)
	b, err := ts.Fetch(testContext(t), d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	sender, ok := b.(Sender)
	if !ok {
		t.Fatalf("an in-flight blob (%T) is no Sender", b)
	}
	return ts, src, data, sender
}

// TestSendToHandsFileSectionsAsReleased: an in-flight blob sends the bytes its download has
// released, no further, as sections of its file that a writer taking files would sendfile; the
// rest follows when it is released, and a range gets exactly its bytes.
func TestSendToHandsFileSectionsAsReleased(t *testing.T) {
	_, src, data, sender := sendingBlob(t, 11, 700<<10)
	w := &fileTaker{got: make(chan []byte, 64)}
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := sender.SendTo(w, 0, int64(len(data)))
		done <- result{n, err}
	}()

	src.put(t, 300<<10)
	// The last released byte waits for the next: the store holds one byte back until the end.
	var first []byte
	for len(first) < 300<<10-1 {
		select {
		case p := <-w.got:
			first = append(first, p...)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d bytes sent, want the %d released", len(first), 300<<10-1)
		}
	}
	if len(first) != 300<<10-1 || !bytes.Equal(first, data[:len(first)]) {
		t.Fatalf("%d bytes sent (equal %v), want the %d released", len(first), bytes.Equal(first, data[:min(len(first), len(data))]), 300<<10-1)
	}
	select {
	case more := <-w.got:
		t.Fatalf("%d bytes sent past what the download released", len(more))
	case <-time.After(50 * time.Millisecond):
	}
	src.put(t, int64(len(data)))
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("SendTo did not finish once the blob was complete")
	}
	close(w.got)
	all := first
	for p := range w.got {
		all = append(all, p...)
	}
	if r.err != nil || r.n != int64(len(data)) || !bytes.Equal(all, data) {
		t.Fatalf("SendTo = %d, %v; sent %d bytes (equal %v); want %d", r.n, r.err, len(all), bytes.Equal(all, data), len(data))
	}
	if w.otherHanded != 0 || w.filesHanded == 0 {
		t.Errorf("sections handed: %d as files, %d otherwise; want every one as a file", w.filesHanded, w.otherHanded)
	}

	// A range of the complete download.
	var buf bytes.Buffer
	n, err := sender.SendTo(&buf, 1000, 5000)
	if err != nil || n != 5000 || !bytes.Equal(buf.Bytes(), data[1000:6000]) {
		t.Fatalf("SendTo(1000, 5000) = %d, %v (equal %v)", n, err, bytes.Equal(buf.Bytes(), data[1000:6000]))
	}
	// Past the end: what there is, and no error (the caller checks the count).
	buf.Reset()
	if n, err := sender.SendTo(&buf, int64(len(data))-10, 100); err != nil || n != 10 {
		t.Fatalf("SendTo past the end = %d, %v; want 10, nil", n, err)
	}
}

// TestSendToNeverSendsAFailedBlobWhole: a download whose bytes do not match the digest fails the
// send before its last byte, as it fails reads.
func TestSendToNeverSendsAFailedBlobWhole(t *testing.T) {
	ts, src, data, sender := sendingBlob(t, 12, 200<<10)
	src.data = bytes.Clone(data)
	src.data[len(data)-1] ^= 0xff
	src.put(t, int64(len(data)))
	var buf bytes.Buffer
	n, err := sender.SendTo(&buf, 0, -1)
	if !errors.Is(err, ErrDigestMismatch) || n >= int64(len(data)) {
		t.Fatalf("SendTo = %d, %v; want fewer than %d bytes and %v", n, err, len(data), ErrDigestMismatch)
	}
	ts.wg.Wait()
	if _, err := os.Stat(src.path); err != nil {
		t.Errorf("the source's file is gone: %v", err)
	}
}
