package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Memory is a content store in memory, for the tests of packages that use the store (the mirror,
// the swarm). It keeps the contract of Store's Get, Fetch and Close, which the conformance suite
// in agent/store/storetest checks on both: Get of a missing blob fails with ErrNotFound; Fetch
// shares one source call among concurrent callers, streams the bytes to every reader as they
// arrive, holds the last byte back until the sha256 matches, and keeps only verified blobs. It
// has no size limit, pins, metrics or stall timeout: a source must return once its ctx is done.
// The zero value is not usable; call NewMemory.
type Memory struct {
	wg sync.WaitGroup // running downloads

	mu       sync.Mutex
	closed   bool
	blobs    map[string][]byte // by hex digest; complete blobs only
	inflight map[string]*memDownload
}

// NewMemory returns an empty Memory.
func NewMemory() *Memory {
	return &Memory{blobs: make(map[string][]byte), inflight: make(map[string]*memDownload)}
}

// Put stores data as a complete blob and returns its digest.
func (m *Memory) Put(data []byte) v1.Hash {
	sum := sha256.Sum256(data)
	d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.blobs[d.Hex] = bytes.Clone(data)
	return d
}

// Get opens a complete blob, or fails with an error wrapping ErrNotFound.
func (m *Memory) Get(d v1.Hash) (Blob, error) {
	if err := checkDigest(d); err != nil {
		return nil, fmt.Errorf("get %s: %w", d, err)
	}
	m.mu.Lock()
	data, ok := m.blobs[d.Hex]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("get %s: %w", d, ErrNotFound)
	}
	return &memBlob{Reader: bytes.NewReader(data), size: int64(len(data))}, nil
}

// Fetch opens blob d, downloading it from src if it is not complete, as Store.Fetch does.
func (m *Memory) Fetch(ctx context.Context, d v1.Hash, src Source) (Blob, error) {
	if err := checkDigest(d); err != nil {
		return nil, fmt.Errorf("fetch %s: %w", d, err)
	}
	m.mu.Lock()
	if data, ok := m.blobs[d.Hex]; ok {
		m.mu.Unlock()
		return &memBlob{Reader: bytes.NewReader(data), size: int64(len(data))}, nil
	}
	dl := m.inflight[d.Hex]
	if dl == nil {
		switch {
		case m.closed:
			m.mu.Unlock()
			return nil, fmt.Errorf("fetch %s: %w", d, ErrClosed)
		case src == nil:
			m.mu.Unlock()
			return nil, fmt.Errorf("fetch %s: no source for a blob not in the store", d)
		}
		dctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
		dl = &memDownload{digest: d, ctx: dctx, cancel: cancel, size: -1,
			opened: make(chan struct{}), changed: make(chan struct{})}
		m.inflight[d.Hex] = dl
		m.wg.Go(func() { m.run(dl, src) })
	}
	m.mu.Unlock()
	select {
	case <-dl.opened:
	case <-ctx.Done():
		return nil, fmt.Errorf("fetch %s: %w", d, ctx.Err())
	}
	if err := dl.failure(); err != nil {
		return nil, err
	}
	return &memInflight{dl: dl, ctx: ctx, closed: make(chan struct{})}, nil
}

// Close stops the downloads in flight (their readers get ErrClosed) and returns once they have
// ended. Blobs already handed out stay readable.
func (m *Memory) Close() error {
	m.mu.Lock()
	m.closed = true
	for _, dl := range m.inflight {
		dl.cancel(ErrClosed)
	}
	m.mu.Unlock()
	m.wg.Wait()
	return nil
}

// run downloads dl from src, and keeps the blob once its size and digest are verified.
func (m *Memory) run(dl *memDownload, src Source) {
	defer dl.cancel(nil)
	data, err := dl.transfer(src)
	m.mu.Lock()
	delete(m.inflight, dl.digest.Hex)
	if err == nil {
		m.blobs[dl.digest.Hex] = data
	}
	m.mu.Unlock()
	if err != nil {
		if cause := context.Cause(dl.ctx); cause != nil {
			err = fmt.Errorf("%w (%w)", cause, err)
		}
		dl.fail(err)
		return
	}
	dl.complete()
}

// memDownload is one transfer from a Source into memory.
type memDownload struct {
	digest v1.Hash
	ctx    context.Context // detached from the starting caller; cancelled by Close
	cancel context.CancelCauseFunc
	opened chan struct{} // closed once the source answered, or the download failed

	mu      sync.Mutex
	data    []byte // received so far
	size    int64  // announced by the source, -1 if unknown
	done    bool   // verified: data is the whole blob
	err     error
	changed chan struct{} // closed and replaced whenever data, done or err change
}

func (dl *memDownload) transfer(src Source) ([]byte, error) {
	d := dl.digest
	rc, size, err := src(dl.ctx)
	if err == nil && rc == nil {
		err = errors.New("source returned no reader")
	}
	if err != nil {
		return nil, fmt.Errorf("fetch %s: open source: %w", d, err)
	}
	var closeOnce sync.Once
	closeSource := func() { closeOnce.Do(func() { rc.Close() }) }
	defer closeSource()
	defer context.AfterFunc(dl.ctx, closeSource)() // unblocks a Read that ignores ctx
	dl.mu.Lock()
	dl.size = size
	dl.mu.Unlock()
	close(dl.opened)

	h := sha256.New()
	buf := make([]byte, 32<<10)
	var data []byte
	for {
		n, rerr := rc.Read(buf)
		if n > 0 {
			if size >= 0 && int64(len(data)+n) > size {
				return nil, fmt.Errorf("fetch %s: %w: source sent more than the %d bytes it announced", d, ErrSizeMismatch, size)
			}
			data = append(data, buf[:n]...)
			h.Write(buf[:n])
			dl.received(data)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return nil, fmt.Errorf("fetch %s: read source after %d bytes: %w", d, len(data), rerr)
		}
	}
	if size >= 0 && int64(len(data)) != size {
		return nil, fmt.Errorf("fetch %s: %w: source sent %d of the %d bytes it announced", d, ErrSizeMismatch, len(data), size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != d.Hex {
		return nil, fmt.Errorf("fetch %s: %w: source sent bytes with digest sha256:%s", d, ErrDigestMismatch, got)
	}
	return data, nil
}

// received publishes the bytes received so far.
func (dl *memDownload) received(data []byte) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.data = data
	dl.broadcastLocked()
}

func (dl *memDownload) complete() {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.done = true
	dl.broadcastLocked()
}

func (dl *memDownload) fail(err error) {
	dl.mu.Lock()
	dl.err = err
	dl.broadcastLocked()
	dl.mu.Unlock()
	select {
	case <-dl.opened:
	default: // failed before the source answered
		close(dl.opened)
	}
}

func (dl *memDownload) broadcastLocked() {
	close(dl.changed)
	dl.changed = make(chan struct{})
}

func (dl *memDownload) failure() error {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.err
}

// readAt copies released bytes at off into p, waiting until at least one is released (all of p
// with full), the blob is complete, the download fails, ctx ends or closed is closed. The last
// byte is released only once the blob is verified.
func (dl *memDownload) readAt(ctx context.Context, closed <-chan struct{}, p []byte, off int64, full bool) (int, error) {
	select {
	case <-closed:
		return 0, fmt.Errorf("read %s: %w", dl.digest, errBlobClosed)
	default:
	}
	n := 0
	for {
		dl.mu.Lock()
		released := int64(len(dl.data))
		if !dl.done && released > 0 {
			released--
		}
		if off < released {
			m := copy(p[n:], dl.data[off:released])
			n += m
			off += int64(m)
		}
		done, err, changed := dl.done, dl.err, dl.changed
		dl.mu.Unlock()
		switch {
		case n == len(p) || (n > 0 && !full):
			return n, nil
		case err != nil:
			return n, err
		case done:
			return n, io.EOF
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return n, ctx.Err()
		case <-closed:
			return n, fmt.Errorf("read %s: %w", dl.digest, errBlobClosed)
		}
	}
}

// memBlob is a complete blob in memory.
type memBlob struct {
	*bytes.Reader
	size   int64
	closed atomic.Bool
}

func (b *memBlob) Size() int64 { return b.size }

// Close makes later reads fail, like those of a closed file.
func (b *memBlob) Close() error {
	b.closed.Store(true)
	return nil
}

func (b *memBlob) Read(p []byte) (int, error) {
	if b.closed.Load() {
		return 0, errBlobClosed
	}
	return b.Reader.Read(p)
}

func (b *memBlob) ReadAt(p []byte, off int64) (int, error) {
	if b.closed.Load() {
		return 0, errBlobClosed
	}
	return b.Reader.ReadAt(p, off)
}

func (b *memBlob) Seek(off int64, whence int) (int64, error) {
	if b.closed.Load() {
		return 0, errBlobClosed
	}
	return b.Reader.Seek(off, whence)
}

// memInflight reads a blob while its download is running, like inflightBlob.
type memInflight struct {
	dl        *memDownload
	ctx       context.Context // of the Fetch that opened it: ends blocking reads
	off       int64
	closed    chan struct{}
	closeOnce sync.Once
}

func (b *memInflight) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err := b.dl.readAt(b.ctx, b.closed, p, b.off, false)
	b.off += int64(n)
	return n, err
}

// ReadAt blocks until len(p) bytes at off have arrived, the blob is complete, or the download fails.
func (b *memInflight) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s at %d: negative offset", b.dl.digest, off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	return b.dl.readAt(b.ctx, b.closed, p, off, true)
}

// Seek sets the offset for Read; relative to the end it needs the size.
func (b *memInflight) Seek(offset int64, whence int) (int64, error) {
	pos, err := seekPosition(b.dl.digest, b.off, b.Size(), offset, whence)
	if err != nil {
		return 0, err
	}
	b.off = pos
	return pos, nil
}

// Size is the announced size, or once the blob is complete its length.
func (b *memInflight) Size() int64 {
	b.dl.mu.Lock()
	defer b.dl.mu.Unlock()
	if b.dl.size < 0 && b.dl.done {
		return int64(len(b.dl.data))
	}
	return b.dl.size
}

// Close unblocks pending reads; the download goes on for other readers.
func (b *memInflight) Close() error {
	b.closeOnce.Do(func() { close(b.closed) })
	return nil
}
