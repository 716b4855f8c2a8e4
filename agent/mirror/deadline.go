package mirror

import (
	"context"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for the mirror's own deadlines.
const (
	// DefaultFirstByteTimeout bounds the wait for the first byte of an answer. containerd 2.x
	// waits 30 s for response headers from a mirror that accepted the connection, and 1.6 waits
	// for ever; a mirror that cannot start answering in this time says so with 503, and
	// containerd moves on to the registry itself.
	DefaultFirstByteTimeout = 8 * time.Second
	// DefaultBodyIdleTimeout bounds the time a body may go without a byte once it has started.
	// The content store gives up on a source silent for 30 s and the swarm reads a late piece
	// from upstream well before that, so a body silent for longer means something inside the
	// agent is stuck; cutting the connection lets the runtime retry (with Range where it can).
	DefaultBodyIdleTimeout = 35 * time.Second
)

// Reasons a request was cut by the mirror's own deadlines (label of deadline_exceeded_total).
const (
	deadlineFirstByte = "first_byte"
	deadlineBodyIdle  = "body_idle"
)

// WithFirstByteTimeout bounds the time to the first byte of every answer (its headers): a request
// the store, the swarm or upstream cannot start serving in time gets 503. 0 or less disables the
// bound.
func WithFirstByteTimeout(d time.Duration) Option { return func(m *Mirror) { m.firstByte = d } }

// WithBodyIdleTimeout bounds the time a body may go without a byte before the connection is
// cut; 0 or less disables the bound.
func WithBodyIdleTimeout(d time.Duration) Option { return func(m *Mirror) { m.bodyIdle = d } }

// guardedWriter is the ResponseWriter the request's work writes to while ServeHTTP keeps watch:
// whoever commits first owns the response. The work commits by sending headers; the watch
// commits by answering itself when the work has not started an answer in time, after which
// everything the work writes is dropped (it may be stuck in a deadlock and write much later,
// when the real writer is no longer valid). It also records the answer, so that whichever of
// the two ends the response counts it, once.
type guardedWriter struct {
	w      http.ResponseWriter
	header http.Header // the work's headers, copied to w's when it commits

	mu        sync.Mutex
	state     guardState
	answer    answer       // what the work sent, under mu
	lastWrite atomic.Int64 // unix nanoseconds of the last body write (or of the headers)
	inWrite   atomic.Int32 // writes in progress: a client that does not read is not our stall
}

// answer is what the work sent: the labels and byte count of the request's metrics.
type answer struct {
	source string // where the content came from or was sought; "" until the work knows
	status int    // 0 until the work sent headers
	bytes  int64  // body bytes
}

type guardState int

const (
	guardPending   guardState = iota // nothing sent yet
	guardCommitted                   // the work sent headers and owns the response
	guardTakenOver                   // the watch answered or cut the response; the work's writes are dropped
	guardSettled                     // the work finished its answer and counted it
)

// Header is the work's own map, so that it never races with the watch on the real one.
func (g *guardedWriter) Header() http.Header { return g.header }

// commit reports whether the work may write: it owns the response, or takes it now.
func (g *guardedWriter) commit(status int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.commitLocked(status)
}

func (g *guardedWriter) commitLocked(status int) bool {
	switch g.state {
	case guardPending:
		g.state = guardCommitted
		g.answer.status = status
		real := g.w.Header()
		for k, v := range g.header {
			real[k] = v
		}
		g.lastWrite.Store(time.Now().UnixNano())
		return true
	case guardCommitted:
		return true
	}
	return false
}

func (g *guardedWriter) WriteHeader(status int) {
	if g.commit(status) {
		g.w.WriteHeader(status)
	}
}

// Write holds the lock while it writes, so that the watch never cuts the response in the
// middle of a write (it would then race with the work on the real writer).
func (g *guardedWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.commitLocked(http.StatusOK) {
		return 0, http.ErrHandlerTimeout
	}
	g.inWrite.Add(1)
	defer g.inWrite.Add(-1)
	n, err := g.w.Write(p)
	g.answer.bytes += int64(n)
	g.lastWrite.Store(time.Now().UnixNano())
	return n, err
}

// ReadFrom keeps sendfile(2) for complete blobs on disk (net/http's writer implements
// io.ReaderFrom); the whole copy counts as one write in progress.
func (g *guardedWriter) ReadFrom(r io.Reader) (int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.commitLocked(http.StatusOK) {
		return 0, http.ErrHandlerTimeout
	}
	g.inWrite.Add(1)
	defer g.inWrite.Add(-1)
	var n int64
	var err error
	if rf, ok := g.w.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{g.w}, r)
	}
	g.answer.bytes += n
	g.lastWrite.Store(time.Now().UnixNano())
	return n, err
}

// Flush passes on to the real writer, which net/http's always implements.
func (g *guardedWriter) Flush() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.commitLocked(http.StatusOK) {
		if f, ok := g.w.(http.Flusher); ok {
			f.Flush()
		}
	}
}

// from records where the answer's content comes from (or is sought), as soon as the work knows.
func (g *guardedWriter) from(source string) {
	g.mu.Lock()
	g.answer.source = source
	g.mu.Unlock()
}

// sent reports whether the work sent headers: after that, a failure can only cut the body short.
func (g *guardedWriter) sent() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.answer.status != 0
}

// settle ends the work's answer. It returns the answer and true when the work still owned the
// response, and so counts it; false when the watch took it over and counted it already.
func (g *guardedWriter) settle() (answer, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state == guardTakenOver {
		return answer{}, false
	}
	g.state = guardSettled
	return g.answer, true
}

// takeOver gives the response to the watch if the work has not sent headers yet, and returns
// what the work knew of its answer so far.
func (g *guardedWriter) takeOver() (answer, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state != guardPending {
		return answer{}, false
	}
	g.state = guardTakenOver
	return g.answer, true
}

// idle reports how long the body has gone without a byte, 0 while a write is in progress.
func (g *guardedWriter) idle(now time.Time) time.Duration {
	if g.inWrite.Load() > 0 {
		return 0
	}
	return now.Sub(time.Unix(0, g.lastWrite.Load()))
}

// abandon drops the work's later writes once the watch cuts the connection, and returns the
// answer sent so far; false if the work settled its answer first (there is nothing to cut).
func (g *guardedWriter) abandon() (answer, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state != guardCommitted {
		return answer{}, false
	}
	g.state = guardTakenOver
	return g.answer, true
}

// serveGuarded runs serve on its own goroutine and answers in its place when it does not start
// an answer within the first-byte timeout, or cuts the connection when a body it started goes
// silent for the body-idle timeout. The work's context is cancelled either way, and the work
// may go on in the background until it notices (or for ever if it is deadlocked): what matters
// is that the runtime is not kept waiting. Whichever of the work and the watch ends the response
// counts it.
func (m *Mirror) serveGuarded(w http.ResponseWriter, r *http.Request, kind string, serve func(*guardedWriter, *http.Request)) {
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	g := &guardedWriter{w: w, header: http.Header{}}
	done := make(chan any, 1)
	go func() {
		defer func() { done <- recover() }()
		serve(g, r.WithContext(ctx))
	}()
	finish := func(p any) {
		if p != nil {
			panic(p) // e.g. http.ErrAbortHandler: net/http recovers it on this goroutine only
		}
	}
	firstByte := m.timer(m.firstByte)
	defer firstByte.Stop()
	select {
	case p := <-done:
		finish(p)
		return
	case <-firstByte.C:
	}
	if a, ok := g.takeOver(); ok {
		cancel()
		m.metrics.deadlines.WithLabelValues(deadlineFirstByte).Inc()
		m.metrics.count(kind, a, resultError)
		m.log.Warn("no answer ready in time; the runtime falls back to its next host",
			"method", r.Method, "path", r.URL.Path, "first_byte_timeout", m.firstByte)
		m.writeError(w, r, nil, badRequest(http.StatusServiceUnavailable, "UNAVAILABLE",
			"%s %s: the mirror could not start answering within %s", kind, r.URL.Path, m.firstByte))
		return
	}
	if m.bodyIdle <= 0 {
		finish(<-done)
		return
	}
	tick := time.NewTicker(max(m.bodyIdle/10, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case p := <-done:
			finish(p)
			return
		case now := <-tick.C:
			if g.idle(now) < m.bodyIdle {
				continue
			}
			a, ok := g.abandon()
			if !ok {
				finish(<-done) // the work has just finished its answer
				return
			}
			cancel()
			m.metrics.deadlines.WithLabelValues(deadlineBodyIdle).Inc()
			m.metrics.count(kind, a, resultAborted)
			m.log.Warn("body silent too long; cutting the connection so the runtime retries",
				"method", r.Method, "path", r.URL.Path, "body_idle_timeout", m.bodyIdle)
			panic(http.ErrAbortHandler)
		}
	}
}

// timer returns a timer for d, or one that never fires when d is not positive.
func (m *Mirror) timer(d time.Duration) *time.Timer {
	if d <= 0 {
		t := time.NewTimer(time.Hour)
		t.Stop()
		return t
	}
	return time.NewTimer(d)
}
