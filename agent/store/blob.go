package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Blob is an open blob: complete on disk, or in flight (reads block until the bytes arrive).
// Read and Seek share one offset and are not safe for concurrent use; ReadAt is.
type Blob interface {
	io.Reader
	io.ReaderAt
	io.Seeker
	io.Closer
	// Size is the blob's full size, or -1 while it is in flight from a source that gave no length.
	Size() int64
}

var errBlobClosed = errors.New("blob closed")

// fileBlob is a complete blob. It exposes its file descriptor through syscall.Conn so that
// io.Copy to a TCP connection (net/http's ServeContent) can use sendfile on the warm path.
type fileBlob struct {
	f         *os.File
	size      int64
	accessed  time.Time
	closeOnce sync.Once
	closeErr  error
}

func (b *fileBlob) Read(p []byte) (int, error)                { return b.f.Read(p) }
func (b *fileBlob) ReadAt(p []byte, off int64) (int, error)   { return b.f.ReadAt(p, off) }
func (b *fileBlob) Seek(off int64, whence int) (int64, error) { return b.f.Seek(off, whence) }
func (b *fileBlob) Size() int64                               { return b.size }
func (b *fileBlob) SyscallConn() (syscall.RawConn, error)     { return b.f.SyscallConn() }
func (b *fileBlob) Close() error {
	b.closeOnce.Do(func() { b.closeErr = b.f.Close() })
	return b.closeErr
}

// inflightBlob reads a blob while its download is running: it reads the download's temporary file
// through its own descriptor, never past the bytes the download has released.
type inflightBlob struct {
	dl     *download
	f      *os.File
	ctx    context.Context // of the Fetch that opened it: ends blocking reads
	off    int64
	closed chan struct{}
	once   sync.Once
}

func (b *inflightBlob) Read(p []byte) (int, error) {
	n, err := b.read(p, b.off, false)
	b.off += int64(n)
	return n, err
}

// ReadAt blocks until len(p) bytes at off have arrived, the blob is complete, or the download fails.
func (b *inflightBlob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s at %d: negative offset", b.dl.digest, off)
	}
	return b.read(p, off, true)
}

// read copies bytes at off into p as they are released. Without full it returns as soon as some
// bytes are available, like Read; with full it fills p, like ReadAt.
func (b *inflightBlob) read(p []byte, off int64, full bool) (int, error) {
	select {
	case <-b.closed:
		return 0, fmt.Errorf("read %s: %w", b.dl.digest, errBlobClosed)
	default:
	}
	n := 0
	for len(p) > 0 {
		avail, err := b.dl.wait(b.ctx, b.closed, off+1)
		if err != nil {
			return n, err
		}
		if off >= avail { // complete and nothing left at off
			return n, io.EOF
		}
		want := int(min(int64(len(p)), avail-off))
		m, err := b.f.ReadAt(p[:want], off)
		n += m
		off += int64(m)
		p = p[m:]
		if m < want {
			// The released bytes are on disk; a short read means the file is damaged.
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return n, fmt.Errorf("read %s: %w", b.dl.digest, err)
		}
		if !full {
			return n, nil
		}
	}
	return n, nil
}

// Sender is an in-flight blob that can hand its bytes to a writer as the download releases
// them, without copying them through this process.
type Sender interface {
	// SendTo writes n bytes of the blob from off to w (n < 0: to the blob's end) as they are
	// released, and returns how many it wrote: fewer than n, with a nil error, when the blob
	// ends first. It uses neither Read's offset nor ReadAt.
	SendTo(w io.Writer, off, n int64) (int64, error)
}

// SendTo hands w each run of released bytes as a section of the blob's file (an
// io.LimitedReader over an *os.File), so that a w that takes files (net/http's response on a TCP
// connection, through io.ReaderFrom) sends them with sendfile(2): a mirror streaming a blob
// still downloading reads and writes no byte of it itself. It moves the descriptor's own offset,
// which Read and ReadAt do not use.
func (b *inflightBlob) SendTo(w io.Writer, off, n int64) (int64, error) {
	if off < 0 {
		return 0, fmt.Errorf("send %s from %d: negative offset", b.dl.digest, off)
	}
	var sent int64
	for n < 0 || sent < n {
		select {
		case <-b.closed:
			return sent, fmt.Errorf("send %s: %w", b.dl.digest, errBlobClosed)
		default:
		}
		avail, err := b.dl.wait(b.ctx, b.closed, off+1)
		if err != nil {
			return sent, err
		}
		if off >= avail { // complete and nothing left at off
			return sent, nil
		}
		run := avail - off
		if n >= 0 {
			run = min(run, n-sent)
		}
		if _, err := b.f.Seek(off, io.SeekStart); err != nil {
			return sent, fmt.Errorf("send %s: %w", b.dl.digest, err)
		}
		m, err := io.Copy(w, &io.LimitedReader{R: b.f, N: run})
		sent += m
		off += m
		if err != nil {
			return sent, fmt.Errorf("send %s at %d: %w", b.dl.digest, off, err)
		}
		if m < run {
			// The released bytes are on disk; a short copy means the file is damaged.
			return sent, fmt.Errorf("send %s at %d: %w", b.dl.digest, off, io.ErrUnexpectedEOF)
		}
	}
	return sent, nil
}

// Seek sets the offset for Read without blocking. Seeking relative to the end needs the size, so it
// fails while a blob of unknown size is still in flight.
func (b *inflightBlob) Seek(offset int64, whence int) (int64, error) {
	pos, err := seekPosition(b.dl.digest, b.off, b.Size(), offset, whence)
	if err != nil {
		return 0, err
	}
	b.off = pos
	return pos, nil
}

// seekPosition is where a Seek of blob d lands from the current offset cur, for a blob of size
// bytes (-1 while unknown).
func seekPosition(d v1.Hash, cur, size, offset int64, whence int) (int64, error) {
	var base int64
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		base = cur
	case io.SeekEnd:
		if base = size; base < 0 {
			return 0, fmt.Errorf("seek %s from end: size not known yet", d)
		}
	default:
		return 0, fmt.Errorf("seek %s: invalid whence %d", d, whence)
	}
	if base+offset < 0 {
		return 0, fmt.Errorf("seek %s: negative position", d)
	}
	return base + offset, nil
}

func (b *inflightBlob) Size() int64 { return b.dl.currentSize() }

// Close releases the descriptor and unblocks pending reads. It does not stop the download, which
// serves other readers and the cache.
func (b *inflightBlob) Close() error {
	var err error
	b.once.Do(func() {
		close(b.closed)
		err = b.f.Close()
	})
	return err
}
