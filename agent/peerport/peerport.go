// Package peerport shares one TCP port between the BitTorrent peer protocol and the agents'
// HTTP control API (Split), and refuses connections from addresses that are not members.
package peerport

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/promreg"
)

// btHandshakeFirstByte starts every unobfuscated BitTorrent connection: the length of the
// protocol name "BitTorrent protocol". No HTTP request starts with it.
const btHandshakeFirstByte = 0x13

// DefaultSniffTimeout bounds the wait for a new connection's first byte; see WithSniffTimeout.
const DefaultSniffTimeout = 5 * time.Second

// SplitOption configures Split.
type SplitOption func(*splitter)

// WithSniffTimeout sets how long a new connection may stay silent before its first byte
// (default DefaultSniffTimeout; zero or less keeps it); a connection that sends nothing in
// time is closed.
func WithSniffTimeout(d time.Duration) SplitOption {
	return func(s *splitter) {
		if d > 0 {
			s.sniffTimeout = d
		}
	}
}

// WithSplitLogger sets the logger for rejected and dropped connections (default: discard).
func WithSplitLogger(l *slog.Logger) SplitOption {
	return func(s *splitter) {
		if l != nil {
			s.log = l
		}
	}
}

// WithSplitRegisterer registers the counter shoal_swarm_rejected_connections_total with reg
// (nil: not registered).
func WithSplitRegisterer(reg prometheus.Registerer) SplitOption {
	return func(s *splitter) { s.reg = reg }
}

// Split shares one listener between the BitTorrent peer protocol and the agents' HTTP control
// API. It accepts connections on l, closes at once those whose remote IP is not allowed
// (counting them in shoal_swarm_rejected_connections_total), and routes each other connection
// by its first byte: 0x13, the start of a BitTorrent handshake (header obfuscation must be
// disabled), to bt, anything else to http. The routed connections replay the byte read and
// report l's local and the peer's remote address. allowed runs on the accept loop, so it
// must be quick (Membership.Allowed is a map lookup).
//
// The first byte is awaited in a goroutine per connection, for at most the sniff timeout, so a
// silent client never holds up the others. A routed connection waits until Accept is called on
// its side (or the side is closed).
//
// Closing: bt and http close independently, so that the torrent client and the HTTP server can
// shut down in either order. Accept on a closed side returns an error wrapping net.ErrClosed,
// and connections routed to it afterwards are closed. Closing the second of the two closes l.
// If l fails (with an error other than a temporary one, which is retried with a backoff), both
// sides return that error from Accept; they must still be closed. anacrolix/torrent retries
// failed Accepts until its client is closed, so close the torrent client before bt. Closing the
// second side returns once the goroutines Split started have ended: connections still being
// sniffed are closed.
func Split(l net.Listener, allowed func(netip.Addr) bool, opts ...SplitOption) (bt, http net.Listener) {
	s := &splitter{
		l:            l,
		allowed:      allowed,
		sniffTimeout: DefaultSniffTimeout,
		log:          slog.New(slog.DiscardHandler),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "rejected_connections_total",
			Help: "Connections to the p2p port closed at once because their IP is not a member's.",
		}),
		open:     2,
		done:     make(chan struct{}),
		failed:   make(chan struct{}),
		sniffing: map[net.Conn]struct{}{},
	}
	for _, opt := range opts {
		opt(s)
	}
	if s.reg != nil {
		s.rejected = promreg.Shared(s.reg, s.rejected)
	}
	s.bt, s.http = s.newSide(), s.newSide()
	s.wg.Go(s.acceptLoop)
	return s.bt, s.http
}

type splitter struct {
	l            net.Listener
	allowed      func(netip.Addr) bool
	sniffTimeout time.Duration
	log          *slog.Logger
	reg          prometheus.Registerer
	rejected     prometheus.Counter
	bt, http     *splitSide
	// sniffHook, if set (by tests), runs in route once a connection is registered as being
	// sniffed and before its deadline is set.
	sniffHook func()

	mu       sync.Mutex
	open     int                   // sides not yet closed
	done     chan struct{}         // closed when both sides are: l is closed, its Accept errors are expected
	sniffing map[net.Conn]struct{} // connections whose first byte is awaited
	wg       sync.WaitGroup        // the accept loop and the routing goroutines

	failed chan struct{} // closed when l fails
	err    error         // why l failed; written before failed is closed
}

func (s *splitter) acceptLoop() {
	var backoff time.Duration
	for {
		c, err := s.l.Accept()
		if err != nil {
			select {
			case <-s.done:
				return // both sides closed l
			default:
			}
			// Like net/http: back off on temporary errors (such as running out of file
			// descriptors) instead of spinning or giving up.
			var ne net.Error
			if errors.As(err, &ne) && ne.Temporary() { //nolint:staticcheck // Temporary is still how accept reports EMFILE and friends.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept on the p2p port failed; retrying", "error", err, "retry_in", backoff)
				t := time.NewTimer(backoff)
				select {
				case <-t.C:
				case <-s.done:
				}
				t.Stop()
				continue
			}
			s.err = err
			close(s.failed)
			return
		}
		backoff = 0
		remote, ok := remoteAddr(c)
		if !ok || !s.allowed(remote.Addr()) {
			s.rejected.Inc()
			s.log.Debug("rejected connection from a non-member", "remote", c.RemoteAddr())
			c.Close()
			continue
		}
		s.wg.Go(func() { s.route(c) })
	}
}

// route reads c's first byte and hands c to the side it belongs to.
func (s *splitter) route(c net.Conn) {
	s.mu.Lock()
	if s.open == 0 {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.sniffing[c] = struct{}{}
	s.mu.Unlock()
	if s.sniffHook != nil {
		s.sniffHook()
	}
	var first [1]byte
	err := c.SetReadDeadline(time.Now().Add(s.sniffTimeout))
	if err == nil {
		_, err = io.ReadFull(c, first[:])
	}
	s.mu.Lock()
	delete(s.sniffing, c)
	s.mu.Unlock()
	if err == nil {
		err = c.SetReadDeadline(time.Time{})
	}
	if err != nil {
		// Also what probes (a bare TCP connect) look like: not worth more than debug.
		s.log.Debug("dropped connection that sent nothing", "remote", c.RemoteAddr(), "error", err)
		c.Close()
		return
	}
	side := s.http
	if first[0] == btHandshakeFirstByte {
		side = s.bt
	}
	side.deliver(&sniffedConn{Conn: c, first: first[:]})
}

func (s *splitter) newSide() *splitSide {
	return &splitSide{s: s, conns: make(chan net.Conn), closed: make(chan struct{})}
}

// splitSide is one of the listeners Split returns.
type splitSide struct {
	s      *splitter
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	// accepting counts the Accept calls in progress: Close waits for them to return, so that
	// an accept loop that is not the caller's (the torrent client's) has left this package's
	// code when Close returns.
	accepting sync.WaitGroup
	acceptMu  sync.Mutex // orders accepting.Add before Close's Wait
}

func (sd *splitSide) deliver(c net.Conn) {
	select {
	case sd.conns <- c:
	case <-sd.closed:
		c.Close()
	}
}

// Accept waits for the next connection routed to this side.
func (sd *splitSide) Accept() (net.Conn, error) {
	sd.acceptMu.Lock()
	select {
	case <-sd.closed: // a closed side accepts nothing, even a connection ready at the same time
		sd.acceptMu.Unlock()
		return nil, sd.opError(net.ErrClosed)
	default:
	}
	sd.accepting.Add(1)
	sd.acceptMu.Unlock()
	defer sd.accepting.Done()
	select {
	case c := <-sd.conns:
		return c, nil
	case <-sd.closed:
		return nil, sd.opError(net.ErrClosed)
	case <-sd.s.failed:
		return nil, sd.s.err // already an *net.OpError from l
	}
}

// Close stops this side and returns once no Accept call on it is in progress; closing the
// second side closes the shared listener. Closing a side again does nothing and returns nil.
func (sd *splitSide) Close() error {
	var err error
	sd.once.Do(func() {
		sd.acceptMu.Lock()
		close(sd.closed)
		sd.acceptMu.Unlock()
		defer sd.accepting.Wait()
		s := sd.s
		s.mu.Lock()
		s.open--
		last := s.open == 0
		if last {
			// Closed rather than given a past deadline: route may be about to set its own
			// deadline, which would replace ours and leave it waiting the full sniff timeout.
			for c := range s.sniffing {
				_ = c.Close() // route's read fails and it gives up on c
			}
		}
		s.mu.Unlock()
		if last {
			close(s.done)
			if cerr := s.l.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
				err = cerr
			}
			s.wg.Wait()
		}
	})
	return err
}

// Addr is the shared listener's address.
func (sd *splitSide) Addr() net.Addr { return sd.s.l.Addr() }

func (sd *splitSide) opError(err error) error {
	return &net.OpError{Op: "accept", Net: sd.Addr().Network(), Addr: sd.Addr(), Err: err}
}

// remoteAddr returns c's remote address, IPv4-mapped IPv6 addresses unmapped.
func remoteAddr(c net.Conn) (netip.AddrPort, bool) {
	var ap netip.AddrPort
	switch a := c.RemoteAddr().(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case nil:
		return ap, false
	default:
		var err error
		if ap, err = netip.ParseAddrPort(a.String()); err != nil {
			return ap, false
		}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
}

// sniffedConn is a connection whose first bytes were read to route it; Read returns them
// again before the rest of the stream.
type sniffedConn struct {
	net.Conn
	mu    sync.Mutex // net.Conn allows concurrent calls
	first []byte
}

// NetConn returns the connection under c, as tls.Conn's does, for socket options
// (internal/sockwater); reading from it directly would skip the bytes c replays.
func (c *sniffedConn) NetConn() net.Conn { return c.Conn }

func (c *sniffedConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.first) > 0 {
		n := copy(p, c.first)
		c.first = c.first[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// SetDeadline reports success on a connection already closed on this side (by a shutdown that
// raced its delivery). anacrolix/torrent panics when it cannot set the handshake deadline of a
// connection it accepted, which would take the agent down; with the error hidden, the
// handshake's first read fails instead and the client drops the connection.
func (c *sniffedConn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetDeadline(t); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// ReadFrom keeps io.Copy into the connection (as net/http does for response bodies) on the
// underlying connection's sendfile/splice path; sniffing only concerns reads.
func (c *sniffedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}
