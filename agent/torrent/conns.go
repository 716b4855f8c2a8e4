package torrent

import (
	"net"
	"net/netip"
	"sync"

	"github.com/shoal-dev/shoal/internal/sockwater"
)

// connSet holds the connections the torrent client was handed, accepted or dialled, until they
// close, so that CloseDisallowed reaches those still in their handshakes too: the client lists
// a connection (Torrent.PeerConns) only once its handshakes are over.
type connSet struct {
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

// add puts c, a connection with a peer at ip, in the set until it is closed.
func (s *connSet) add(c net.Conn, ip netip.Addr) *trackedConn {
	tc := &trackedConn{Conn: c, ip: ip.Unmap(), set: s, water: newWireWater(sockwater.Socket(c))}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[*trackedConn]struct{}{}
	}
	s.conns[tc] = struct{}{}
	return tc
}

// closeIf closes the connections whose peer IP match selects.
func (s *connSet) closeIf(match func(netip.Addr) bool) {
	s.mu.Lock()
	var doomed []*trackedConn
	for c := range s.conns {
		if match(c.ip) {
			doomed = append(doomed, c)
		}
	}
	s.mu.Unlock()
	for _, c := range doomed {
		_ = c.Close()
	}
}

// trackedConn is a connection in a connSet. Its reads wake once per chunk rather than per
// packet (see wireWater).
type trackedConn struct {
	net.Conn
	ip    netip.Addr
	set   *connSet
	water *wireWater
}

// Read implements net.Conn. The torrent client reads a connection from one goroutine at a time.
func (c *trackedConn) Read(p []byte) (int, error) {
	c.water.before()
	n, err := c.Conn.Read(p)
	c.water.after(p[:n])
	return n, err
}

// Close implements net.Conn.
func (c *trackedConn) Close() error {
	c.set.mu.Lock()
	delete(c.set.conns, c)
	c.set.mu.Unlock()
	return c.Conn.Close()
}

// trackingListener is Config.Listener as the torrent client sees it: every connection it
// accepts is in conns.
type trackingListener struct {
	net.Listener
	conns *connSet
}

// Accept implements net.Listener. The torrent client checks the block list (see blocklist) after
// Accept returns, so a connection from a peer that Allowed refuses by then is refused; one that
// it refuses later is in conns when CloseDisallowed runs.
func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tcp, ok := c.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0) // as the torrent client does to the TCP connections it sees
	}
	ap, perr := netip.ParseAddrPort(c.RemoteAddr().String())
	if perr != nil {
		return c, nil // not an IP peer: the block list refuses it
	}
	return l.conns.add(c, ap.Addr()), nil
}
