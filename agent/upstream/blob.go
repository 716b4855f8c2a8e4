package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/oci"
	"github.com/shoal-dev/shoal/internal/sockwater"
)

// Blob opens bytes [offset, offset+length) of a blob (length -1: to the end) and returns them
// with the blob's total size, from Content-Length or Content-Range (-1 if the registry did not
// say). Redirects (to object storage) are followed without the registry's credentials.
//
// A 206 answer must carry the Content-Range asked for (ErrInvalid otherwise). A registry that
// ignores Range answers a ranged request (offset > 0 or length > 0) with 200 and the whole
// blob: Blob then returns ErrRangeUnsupported at once, without reading the body, so that a
// segmented fetch falls back to one whole-blob download (a body cut after length bytes would
// still have cost whatever the registry pushed before the connection closed: several copies of
// the blob when every node did it). Ask with offset 0 and length -1 for the whole blob.
//
// The bytes are not verified against d: a range cannot be, and the store verifies whole blobs.
// Reading fails with ErrUnavailable when no byte arrives for the BlobIdle timeout. The caller
// must close the body.
func (c *Client) Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error) {
	t, op, err := c.blobTarget("get", registry, repo, d)
	if err != nil {
		return nil, 0, err
	}
	if offset < 0 || length < -1 {
		return nil, 0, t.fail(op, 0, "", ErrBadRequest, fmt.Errorf("bad range: offset %d, length %d", offset, length))
	}
	if length == 0 {
		size, err := c.HeadBlob(ctx, registry, repo, d)
		if err != nil {
			return nil, 0, err
		}
		return io.NopCloser(strings.NewReader("")), size, nil
	}
	header := http.Header{}
	ranged := offset > 0 || length > 0
	if ranged {
		header.Set("Range", "bytes="+byteRange(offset, length))
		op = rangeOp(op, offset, length)
	}

	// The request context lives as long as the body: cancelling it is how a stalled body is cut.
	ctx, cancel := context.WithCancelCause(ctx)
	var connMu sync.Mutex
	var conn net.Conn // the last one handed out: the blob's, after any token request or redirect
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		connMu.Lock()
		conn = info.Conn
		connMu.Unlock()
	}})
	resp, derr := c.do(ctx, t, kindBlob, op, http.MethodGet, blobPath(repo, d), header)
	if derr != nil {
		cancel(nil)
		return nil, 0, derr
	}
	fail := func(kind, err error) (io.ReadCloser, int64, error) {
		resp.Body.Close()
		cancel(nil)
		return nil, 0, t.fail(op, resp.StatusCode, "", kind, err)
	}

	total := resp.ContentLength
	switch resp.StatusCode {
	case http.StatusOK:
		if ranged {
			return fail(ErrRangeUnsupported, errors.New("asked for a range, got the whole blob"))
		}
	case http.StatusPartialContent:
		cr := resp.Header.Get("Content-Range")
		start, end, size, err := parseContentRange(cr)
		if err != nil {
			return fail(ErrInvalid, err)
		}
		wantEnd := int64(-1) // unknown: to the end of a blob of unknown size
		switch {
		case length > 0 && size >= 0:
			wantEnd = min(offset+length, size) - 1
		case length > 0:
			wantEnd = offset + length - 1
		case size >= 0:
			wantEnd = size - 1
		}
		if start != offset || (wantEnd >= 0 && end != wantEnd) {
			return fail(ErrInvalid, fmt.Errorf("asked for bytes %d-%d, got Content-Range %q", offset, wantEnd, cr))
		}
		if resp.ContentLength >= 0 && resp.ContentLength != end-start+1 {
			return fail(ErrInvalid, fmt.Errorf("got Content-Range %q with Content-Length %d", cr, resp.ContentLength))
		}
		total = size
	default:
		status, code, cause := responseError(resp)
		resp.Body.Close()
		cancel(nil)
		return nil, 0, t.fail(op, status, code, statusKind(status, code), cause)
	}
	body := &blobReader{
		ctx:    ctx,
		body:   resp.Body,
		left:   -1,
		idle:   c.timeouts.BlobIdle,
		bytes:  c.metrics.received(t.registry),
		cancel: cancel,
		fail: func(err error) error {
			return t.fail(op+": read body", resp.StatusCode, "", failureKind(err), err)
		},
	}
	if resp.ProtoMajor == 1 && resp.ContentLength > 0 && !resp.Uncompressed {
		// An HTTP/1 body of known length has its connection to itself: the reader may be
		// woken once per sockwater.Default bytes (an HTTP/2 connection carries other streams).
		connMu.Lock()
		body.sock, body.left = sockwater.Socket(conn), resp.ContentLength
		connMu.Unlock()
	}
	stalled := fmt.Errorf("no bytes received for %s", c.timeouts.BlobIdle)
	body.timer = time.AfterFunc(c.timeouts.BlobIdle, func() {
		if !body.waiting.Load() {
			return // the Read returned meanwhile; the next one arms the timer again
		}
		if body.water.Load() > 1 && sockwater.Queued(body.sock) > 0 {
			// Bytes came, fewer than the mark: a slow registry, not a stalled one. Wake the
			// Read with what is there.
			body.timer.Reset(c.timeouts.BlobIdle)
			body.water.Store(1)
			sockwater.Set(body.sock, 1)
			return
		}
		cancel(stalled)
	})
	body.timer.Stop() // armed only while a Read waits for the registry
	return body, total, nil
}

// HeadBlob returns a blob's size, following redirects.
func (c *Client) HeadBlob(ctx context.Context, registry, repo string, d v1.Hash) (int64, error) {
	t, op, err := c.blobTarget("head", registry, repo, d)
	if err != nil {
		return 0, err
	}
	resp, derr := c.do(ctx, t, kindBlob, op, http.MethodHead, blobPath(repo, d), nil)
	if derr != nil {
		return 0, derr
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		status, code, cause := responseError(resp)
		return 0, t.fail(op, status, code, statusKind(status, code), cause)
	}
	if resp.ContentLength < 0 {
		return 0, t.fail(op, resp.StatusCode, "", ErrInvalid, errors.New("no Content-Length"))
	}
	return resp.ContentLength, nil
}

func (c *Client) blobTarget(verb, registry, repo string, d v1.Hash) (target, string, error) {
	op := verb + " blob " + repo + "@" + d.String()
	t, terr := c.target(registry, repo)
	if terr != nil {
		terr.Op = op
		return t, op, terr
	}
	if _, err := oci.ParseDigest(d.String()); err != nil {
		return t, op, t.fail(op, 0, "", ErrBadRequest, err)
	}
	return t, op, nil
}

// byteRange writes bytes [offset, offset+length) as in a Range header, "START-END" or "START-"
// for length -1.
func byteRange(offset, length int64) string {
	end := ""
	if length > 0 {
		end = strconv.FormatInt(offset+length-1, 10)
	}
	return strconv.FormatInt(offset, 10) + "-" + end
}

// rangeOp is the Op of a ranged blob request.
func rangeOp(op string, offset, length int64) string {
	return op + " (bytes " + byteRange(offset, length) + ")"
}

func blobPath(repo string, d v1.Hash) string { return "/v2/" + repo + "/blobs/" + d.String() }

// parseContentRange parses "bytes START-END/SIZE"; size is -1 for "*".
func parseContentRange(s string) (start, end, size int64, err error) {
	bad := func() (int64, int64, int64, error) { return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s) }
	spec, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return bad()
	}
	rng, sizeStr, ok := strings.Cut(spec, "/")
	if !ok {
		return bad()
	}
	startStr, endStr, ok := strings.Cut(rng, "-")
	if !ok {
		return bad()
	}
	if start, err = strconv.ParseInt(startStr, 10, 64); err != nil || start < 0 {
		return bad()
	}
	if end, err = strconv.ParseInt(endStr, 10, 64); err != nil || end < start {
		return bad()
	}
	size = -1
	if sizeStr != "*" {
		if size, err = strconv.ParseInt(sizeStr, 10, 64); err != nil || size <= end {
			return bad()
		}
	}
	return start, end, size, nil
}

// blobReader is a blob body that fails when no byte arrives for idle while a Read is waiting:
// the timer cancels the request's context, which closes the connection under the Read. Time
// between Reads (a slow consumer) does not count.
type blobReader struct {
	ctx  context.Context
	body io.ReadCloser
	// sock is the body's socket when its low water mark may be raised (see sockwater), with
	// left the body's bytes still to read (-1: unknown) and water the mark set.
	sock    syscall.RawConn
	left    int64
	water   atomic.Int32
	waiting atomic.Bool // a Read waits for the registry
	idle    time.Duration
	timer   *time.Timer
	bytes   prometheus.Counter
	cancel  context.CancelCauseFunc
	fail    func(error) error
	closed  atomic.Bool
}

func (r *blobReader) Read(p []byte) (int, error) {
	if r.sock != nil {
		want, most := sockwater.Next(r.left, len(p))
		p = p[:most]
		if int32(want) != r.water.Load() {
			r.water.Store(int32(want))
			sockwater.Set(r.sock, want)
		}
	}
	r.waiting.Store(true)
	r.timer.Reset(r.idle)
	n, err := r.body.Read(p)
	r.timer.Stop()
	r.waiting.Store(false)
	if n > 0 {
		r.bytes.Add(float64(n))
		if r.left > 0 {
			r.left -= int64(n)
		}
	}
	if err != nil && !errors.Is(err, io.EOF) {
		if cause := context.Cause(r.ctx); cause != nil && !r.closed.Load() {
			err = cause // "no bytes received for 30s" rather than "context canceled"
		}
		err = r.fail(err)
	}
	return n, err
}

func (r *blobReader) Close() error {
	r.closed.Store(true)
	r.timer.Stop()
	err := r.body.Close()
	r.cancel(nil)
	return err
}
