package torrent

import (
	"cmp"
	"errors"
	"hash/crc32"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/iplist"
)

// Every ban is the adapter's own, and expires (banDuration). A blob's torrent checks its pieces
// itself (see blobStorage), which turns off the torrent client's own way of finding which peer
// corrupted a piece that several peers sent blocks of. So the adapter keeps a checksum of every
// block a peer sends until the block's piece verifies, and then bans every peer whose block
// differs from the verified bytes.
//
// The client also bans, for the rest of its life, the only sender of a piece that fails its
// check (v1.62.0, Torrent.pieceHashed: "piece failed hash. banning peer"), and has no setting
// to stop it nor any way to lift a ban: a repaired member would stay banned until the agent
// restarts. It leaves alone the senders of a piece whose check fails with an error (the fault
// may be the storage's), so a blob piece reports a mismatch as an error (errPieceCorrupt), and
// the adapter applies the client's rule itself, with expiry: when a failed piece's bytes are
// exactly what one peer sent for the whole of it, that peer is banned at once.
// TestCorruptPieceBanExpires fails if the client bans a peer itself.

// errPieceCorrupt is what a blob piece's check returns when the piece does not match its hash.
var errPieceCorrupt = errors.New("piece does not match its hash")

// sentBlock is a block a peer sent for a piece.
type sentBlock struct {
	peer   netip.Addr
	offset int64 // in the piece
	length int64
	sum    uint32 // CRC-32C of the bytes sent
}

// maxSentBlocks bounds the blocks kept per piece: a piece that fails again and again (many
// senders, some lying) keeps only its most recent ones.
const maxSentBlocks = 256

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sentBlocks records, per piece, the blocks peers sent since the piece last verified.
type sentBlocks struct {
	mu     sync.Mutex
	pieces map[int][]sentBlock
}

func (s *sentBlocks) record(piece int, offset int64, data []byte, peer netip.Addr) {
	b := sentBlock{peer: peer, offset: offset, length: int64(len(data)), sum: crc32.Checksum(data, castagnoli)}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pieces == nil {
		s.pieces = map[int][]sentBlock{}
	}
	blocks := s.pieces[piece]
	if len(blocks) >= maxSentBlocks {
		blocks = append(blocks[:0], blocks[len(blocks)/2:]...)
	}
	s.pieces[piece] = append(blocks, b)
}

// of returns a copy of the blocks recorded for piece.
func (s *sentBlocks) of(piece int) []sentBlock {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sentBlock(nil), s.pieces[piece]...)
}

func (s *sentBlocks) forget(piece int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pieces, piece)
}

// forgetPeers forgets the blocks of piece that peers sent.
func (s *sentBlocks) forgetPeers(piece int, peers []netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pieces[piece] = slices.DeleteFunc(s.pieces[piece], func(b sentBlock) bool { return slices.Contains(peers, b.peer) })
}

// blockChecker is an io.Writer that takes a piece's bytes in order and computes the checksums
// of the recorded blocks over them.
type blockChecker struct {
	blocks []sentBlock
	sums   []uint32
	offset int64 // in the piece, of the next byte written
}

func newBlockChecker(blocks []sentBlock) *blockChecker {
	return &blockChecker{blocks: blocks, sums: make([]uint32, len(blocks))}
}

func (c *blockChecker) Write(data []byte) (int, error) {
	end := c.offset + int64(len(data))
	for j, b := range c.blocks {
		lo, hi := max(b.offset, c.offset), min(b.offset+b.length, end)
		if lo < hi {
			c.sums[j] = crc32.Update(c.sums[j], castagnoli, data[lo-c.offset:hi-c.offset])
		}
	}
	c.offset = end
	return len(data), nil
}

// liars returns the peers that sent a block that differs from the bytes written.
func (c *blockChecker) liars() []netip.Addr {
	var bad []netip.Addr
	for j, b := range c.blocks {
		if c.sums[j] != b.sum && !slices.Contains(bad, b.peer) {
			bad = append(bad, b.peer)
		}
	}
	return bad
}

// wholeSenders returns the peers whose blocks, as written, hold every byte of a piece of length
// bytes: the bytes written are exactly what such a peer sent.
func (c *blockChecker) wholeSenders(length int64) []netip.Addr {
	type span struct{ from, to int64 }
	byPeer := map[netip.Addr][]span{}
	for j, b := range c.blocks {
		if c.sums[j] == b.sum {
			byPeer[b.peer] = append(byPeer[b.peer], span{b.offset, b.offset + b.length})
		}
	}
	var whole []netip.Addr
	for peer, spans := range byPeer {
		slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.from, b.from) })
		covered := int64(0)
		for _, sp := range spans {
			if sp.from > covered {
				break
			}
			covered = max(covered, sp.to)
		}
		if covered >= length {
			whole = append(whole, peer)
		}
	}
	return whole
}

// recordSentBlock is the torrent client callback that records every block received for a blob.
func (c *Client) recordSentBlock(ev torrent.ReceivedUsefulDataEvent) {
	addr, ok := peerIP(ev.Peer.RemoteAddr)
	if !ok {
		return
	}
	t := c.lookup(ev.Peer.Torrent())
	if t == nil {
		return
	}
	m := ev.Message
	t.st.sent.record(int(m.Index), int64(m.Begin), m.Piece, addr)
}

// peerIP returns the IP of a peer's address as the torrent client holds it.
func peerIP(a torrent.PeerRemoteAddr) (netip.Addr, bool) {
	switch a := a.(type) {
	case *net.TCPAddr: // accepted connections
		return a.AddrPort().Addr().Unmap(), true
	case netip.AddrPort: // dialled ones: the address given to AddPeers
		return a.Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

// ban stops all traffic with a peer that sent bad data for banDuration: its connections close,
// and the torrent client refuses new ones (see bannedIPs).
func (c *Client) ban(addr netip.Addr) {
	if !c.banned.add(addr, c.banned.now().Add(banDuration)) {
		return
	}
	if c.cfg.OnBan != nil {
		c.cfg.OnBan(addr, banDuration)
	}
	for _, t := range c.c.Torrents() {
		for _, pc := range t.PeerConns() {
			if ip, ok := peerIP(pc.RemoteAddr); ok && ip == addr {
				_ = pc.Close()
			}
		}
	}
}

// banDuration is how long a ban lasts: a member whose disk or memory corrupted data may be
// repaired (or replaced under the same address), and must then be able to take part again
// without a restart of every other agent.
const banDuration = 30 * time.Minute

// bannedIPs is the torrent client's block list: the peers this node banned, until when.
type bannedIPs struct {
	set   sync.Map         // netip.Addr → time.Time
	clock func() time.Time // time.Now if nil
}

func (b *bannedIPs) now() time.Time {
	if b.clock != nil {
		return b.clock()
	}
	return time.Now()
}

// add bans addr until the given time, and reports whether it was not banned already.
func (b *bannedIPs) add(addr netip.Addr, until time.Time) bool {
	prev, loaded := b.set.Swap(addr.Unmap(), until)
	if !loaded {
		return true
	}
	t, ok := prev.(time.Time)
	return !ok || b.now().After(t)
}

// banned reports whether addr is banned now, forgetting a ban that has expired.
func (b *bannedIPs) banned(addr netip.Addr) bool {
	v, ok := b.set.Load(addr.Unmap())
	if !ok {
		return false
	}
	if until, ok := v.(time.Time); ok && b.now().Before(until) {
		return true
	}
	b.set.CompareAndDelete(addr.Unmap(), v)
	return false
}

var _ iplist.Ranger = (*bannedIPs)(nil)

// Lookup implements iplist.Ranger.
func (b *bannedIPs) Lookup(ip net.IP) (iplist.Range, bool) {
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return iplist.Range{}, false
	}
	if !b.banned(addr) {
		return iplist.Range{}, false
	}
	return iplist.Range{First: ip, Last: ip, Description: "sent bad data"}, true
}

// NumRanges implements iplist.Ranger.
func (b *bannedIPs) NumRanges() int {
	n := 0
	b.set.Range(func(any, any) bool { n++; return true })
	return n
}

// blocklist is the torrent client's IP block list: the peers this node banned, and the IPs that
// are not members' (see Config.Allowed).
type blocklist struct {
	banned  *bannedIPs
	allowed func(netip.Addr) bool // nil allows every IP
}

var _ iplist.Ranger = blocklist{}

// Lookup implements iplist.Ranger.
func (b blocklist) Lookup(ip net.IP) (iplist.Range, bool) {
	if addr, ok := netip.AddrFromSlice(ip); ok && b.allowed != nil && !b.allowed(addr.Unmap()) {
		return iplist.Range{First: ip, Last: ip, Description: "not a member"}, true
	}
	return b.banned.Lookup(ip)
}

// NumRanges implements iplist.Ranger: the bans (non-members are not counted).
func (b blocklist) NumRanges() int { return b.banned.NumRanges() }

// IsBanned reports whether this node bans addr now, because it sent data that differed from
// its verified piece or sent the whole of a piece that failed.
func (c *Client) IsBanned(addr netip.Addr) bool { return c.banned.banned(addr) }
