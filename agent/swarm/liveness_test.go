package swarm

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/anacrolix/torrent"
)

// testMembers returns n member addresses, 10.x.y.z:7070.
func testMembers(n int) []netip.AddrPort {
	ms := make([]netip.AddrPort, n)
	for i := range ms {
		ms[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 7070)
	}
	return ms
}

// TestIsTimeout: only timeouts are left to the probes; a refused or reset connection counts as
// a failure of the member at once.
func TestIsTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	_, refused := net.DialTimeout("tcp", addr, time.Second)
	if refused == nil || isTimeout(refused) {
		t.Errorf("refused connection: isTimeout(%v) = true or no error", refused)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	_, timedOut := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if !isTimeout(timedOut) {
		t.Errorf("isTimeout(%v) = false for a dial cut by its deadline", timedOut)
	}
	if isTimeout(nil) || isTimeout(errors.New("connection reset by peer")) {
		t.Error("isTimeout is true for nil or a plain error")
	}
}

// recordingMembers is a Membership that records who was reported alive.
type recordingMembers struct {
	mu    sync.Mutex
	alive []netip.Addr
}

func (m *recordingMembers) Self() netip.AddrPort         { return netip.AddrPort{} }
func (m *recordingMembers) Members() []netip.AddrPort    { return nil }
func (m *recordingMembers) Live() []netip.AddrPort       { return nil }
func (m *recordingMembers) Allowed(netip.Addr) bool      { return true }
func (m *recordingMembers) ReportFailure(netip.AddrPort) {}
func (m *recordingMembers) ReportAlive(addr netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.alive = append(m.alive, addr)
}

// TestDataFromPeersCountsAsHeard: the torrent client's callback reports the sender of useful
// data alive, whether the connection was accepted (a *net.TCPAddr from the socket) or dialled
// (the netip.AddrPort the swarm gave the client).
func TestDataFromPeersCountsAsHeard(t *testing.T) {
	peerB, peerC := netip.MustParseAddrPort("10.0.0.2:7070"), netip.MustParseAddrPort("10.0.0.3:7070")
	m := &recordingMembers{}
	report := reportSenderAlive(m)
	report(torrent.ReceivedUsefulDataEvent{Peer: &torrent.Peer{RemoteAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(peerB.Addr(), 51000))}})
	report(torrent.ReceivedUsefulDataEvent{Peer: &torrent.Peer{RemoteAddr: peerC}})
	if len(m.alive) != 2 || m.alive[0] != peerB.Addr() || m.alive[1] != peerC.Addr() {
		t.Errorf("reported alive %v, want %v and %v", m.alive, peerB.Addr(), peerC.Addr())
	}
}

// TestBansExpire: a banned peer is refused until its ban runs out, then admitted again (a
// repaired member must not stay banned until every agent restarts).
func TestBansExpire(t *testing.T) {
	var b bannedIPs
	peer := netip.MustParseAddr("10.0.0.9")
	if !b.add(peer, time.Now().Add(time.Hour)) {
		t.Fatal("first ban not reported as new")
	}
	if b.add(peer, time.Now().Add(time.Hour)) {
		t.Error("a second ban while banned reported as new")
	}
	if _, blocked := b.Lookup(peer.AsSlice()); !blocked {
		t.Error("a banned peer is not blocked")
	}
	b.add(peer, time.Now().Add(-time.Second)) // as if the ban had run out
	if _, blocked := b.Lookup(peer.AsSlice()); blocked {
		t.Error("a peer whose ban ran out is still blocked")
	}
	if !b.add(peer, time.Now().Add(time.Hour)) {
		t.Error("banning again after expiry not reported as new")
	}
}
