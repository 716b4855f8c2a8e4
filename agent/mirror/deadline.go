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
// when the real writer is no longer valid).
type guardedWriter struct {
	w      http.ResponseWriter
	header http.Header // the work's headers, copied to w's when it commits

	mu        sync.Mutex
	state     guardState
	lastWrite atomic.Int64 // unix nanoseconds of the last body write (or of the headers)
	inWrite   atomic.Int32 // writes in progress: a client that does not read is not our stall
}

type guardState int

const (
	guardPending   guardState = iota // nothing sent yet
	guardCommitted                   // the work sent headers and owns the response
	guardTakenOver                   // the watch answered or cut the response; the work's writes are dropped
)

// Header is the work's own map, so that it never races with the watch on the real one.
func (g *guardedWriter) Header() http.Header { return g.header }

// commit reports whether the work may write: it owns the response, or takes it now.
func (g *guardedWriter) commit() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.commitLocked()
}

func (g *guardedWriter) commitLocked() bool {
	switch g.state {
	case guardPending:
		g.state = guardCommitted
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
	if g.commit() {
		g.w.WriteHeader(status)
	}
}

// Write holds the lock while it writes, so that the watch never cuts the response in the
// middle of a write (it would then race with the work on the real writer).
func (g *guardedWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.commitLocked() {
		return 0, http.ErrHandlerTimeout
	}
	g.inWrite.Add(1)
	defer g.inWrite.Add(-1)
	n, err := g.w.Write(p)
	g.lastWrite.Store(time.Now().UnixNano())
	return n, err
}

// ReadFrom keeps sendfile(2) for complete blobs on disk (net/http's writer implements
// io.ReaderFrom); the whole copy counts as one write in progress.
func (g *guardedWriter) ReadFrom(r io.Reader) (int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.commitLocked() {
		return 0, http.ErrHandlerTimeout
	}
	g.inWrite.Add(1)
	defer g.inWrite.Add(-1)
	defer func() { g.lastWrite.Store(time.Now().UnixNano()) }()
	if rf, ok := g.w.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{g.w}, r)
}

// Flush passes on to the real writer, which net/http's always implements.
func (g *guardedWriter) Flush() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.commitLocked() {
		if f, ok := g.w.(http.Flusher); ok {
			f.Flush()
		}
	}
}

// takeOver gives the response to the watch if the work has not sent headers yet.
func (g *guardedWriter) takeOver() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state != guardPending {
		return false
	}
	g.state = guardTakenOver
	return true
}

// idle reports how long the body has gone without a byte, 0 while a write is in progress.
func (g *guardedWriter) idle(now time.Time) time.Duration {
	if g.inWrite.Load() > 0 {
		return 0
	}
	return now.Sub(time.Unix(0, g.lastWrite.Load()))
}

// abandon drops the work's later writes once the watch cuts the connection.
func (g *guardedWriter) abandon() {
	g.mu.Lock()
	g.state = guardTakenOver
	g.mu.Unlock()
}

// serveGuarded runs serve on its own goroutine and answers in its place when it does not start
// an answer within the first-byte timeout, or cuts the connection when a body it started goes
// silent for the body-idle timeout. The work's context is cancelled either way, and the work
// may go on in the background until it notices (or for ever if it is deadlocked): what matters
// is that the runtime is not kept waiting.
func (m *Mirror) serveGuarded(w http.ResponseWriter, r *http.Request, kind string, serve func(http.ResponseWriter, *http.Request)) {
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
	if g.takeOver() {
		cancel()
		m.metrics.deadlines.WithLabelValues(deadlineFirstByte).Inc()
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
			g.abandon()
			cancel()
			m.metrics.deadlines.WithLabelValues(deadlineBodyIdle).Inc()
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
