package torrent

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/anacrolix/torrent"
)

// verifiedVersion is the version of github.com/anacrolix/torrent whose internals this package
// was checked against (requestwindow.go, Kick, refreshPriorities, log.go, ban.go).
const verifiedVersion = "v1.62.0"

// TestClientVersionIsTheVerifiedOne fails when the torrent client's version changes: every
// workaround in this package leans on its internals, so an upgrade must re-verify each (their
// behaviour tests, the swarm's tests and make bench) before this constant moves.
func TestClientVersionIsTheVerifiedOne(t *testing.T) {
	// Tests run in the package's directory; go.mod is two levels up.
	data, err := os.ReadFile(filepath.Join("..", "..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/anacrolix/torrent\s+(\S+)`).FindSubmatch(data)
	if m == nil {
		t.Fatal("go.mod does not require github.com/anacrolix/torrent")
	}
	if got := string(m[1]); got != verifiedVersion {
		t.Fatalf("go.mod requires github.com/anacrolix/torrent %s, the workarounds here were verified on %s: re-verify them, then update verifiedVersion", got, verifiedVersion)
	}
}

// TestDataFromPeersIsReported: the client's callback reports the sender of useful data,
// whether the connection was accepted (a *net.TCPAddr from the socket) or dialled (the
// netip.AddrPort the swarm gave the client).
func TestDataFromPeersIsReported(t *testing.T) {
	peerB, peerC := netip.MustParseAddrPort("10.0.0.2:7070"), netip.MustParseAddrPort("10.0.0.3:7070")
	var got []netip.Addr
	c := &Client{cfg: Config{OnData: func(a netip.Addr) { got = append(got, a) }}}
	c.reportData(torrent.ReceivedUsefulDataEvent{Peer: &torrent.Peer{RemoteAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(peerB.Addr(), 51000))}})
	c.reportData(torrent.ReceivedUsefulDataEvent{Peer: &torrent.Peer{RemoteAddr: peerC}})
	if len(got) != 2 || got[0] != peerB.Addr() || got[1] != peerC.Addr() {
		t.Errorf("reported %v, want %v and %v", got, peerB.Addr(), peerC.Addr())
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
