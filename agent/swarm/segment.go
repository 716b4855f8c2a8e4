package swarm

import (
	"context"
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes are SHA-1; blobs are verified by sha256 too
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"time"

	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/rendezvous"
	"github.com/shoal-dev/shoal/agent/torrent"
)

// segment is this node's state for one segment of a blob: its info (the hashes of its pieces)
// once known, seeded here or learned from its seeder, and, when this node seeds it, the peers that
// asked for it (the seeder is the segment's tracker).
type segment struct {
	k int

	mu      sync.Mutex
	ready   chan struct{} // closed when info is set or seeding failed
	info    []byte
	seeding bool  // a fetch from upstream (or the local store) is running
	err     error // why the last seeding attempt failed
	peers   map[netip.AddrPort]time.Time
	// source is the seeder this node learned the info from (invalid when seeded here), and
	// rescuing says a rescue of the segment runs (see Swarm.rescue).
	source    netip.AddrPort
	rescuing  bool
	rescued   time.Time  // when the last rescue began
	refetchMu sync.Mutex // one fetch of the segment's bytes again at a time (see refetchSegment)
}

func newSegment(k int) *segment {
	return &segment{k: k, ready: make(chan struct{}), peers: map[netip.AddrPort]time.Time{}}
}

// state returns the info if known, and the channel that closes when that changes.
func (s *segment) state() (info []byte, ready <-chan struct{}, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info, s.ready, s.err
}

// publish records the segment's info and wakes everyone waiting for it.
func (s *segment) publish(info []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.info != nil {
		return
	}
	s.info, s.err, s.seeding = info, nil, false
	close(s.ready)
}

// fail ends a seeding attempt: waiters see err, and the next caller may try again.
func (s *segment) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.info != nil {
		return
	}
	s.err, s.seeding = err, false
	close(s.ready)
	s.ready = make(chan struct{})
}

// setSource records the seeder the segment's info came from.
func (s *segment) setSource(seeder netip.AddrPort) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.source = seeder
}

// beginRescue returns the segment's seeder and true if a rescue may start: the info came from
// another member (from, when from is valid), no rescue runs, and none began within every.
func (s *segment) beginRescue(now time.Time, every time.Duration, from netip.AddrPort) (netip.AddrPort, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rescuing || s.info == nil || !s.source.IsValid() || now.Sub(s.rescued) < every ||
		(from.IsValid() && from != s.source) {
		return netip.AddrPort{}, false
	}
	s.rescuing, s.rescued = true, now
	return s.source, true
}

// endRescue ends a rescue. When it moved the segment to another source (next, or this node
// when next is invalid), later rescues are about that one.
func (s *segment) endRescue(moved bool, next netip.AddrPort) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rescuing = false
	if moved {
		s.source = next
	}
}

// startSeeding reports whether the caller should start seeding (nobody else is, and no info yet).
func (s *segment) startSeeding() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.info != nil || s.seeding {
		return false
	}
	s.seeding, s.err = true, nil
	return true
}

// addPeer records a peer that asked for this segment and returns the peers it should swarm
// with: its neighbours (see neighbours) among the others that asked within peerTTL and self, the
// seeder. Peers not heard from for peerTTL are forgotten, and so are those whose IP member
// refuses (they left the swarm).
func (s *segment) addPeer(key string, self, p netip.AddrPort, now time.Time, degree int, member func(netip.Addr) bool) []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	for addr, seen := range s.peers {
		if now.Sub(seen) > peerTTL || !member(addr.Addr()) {
			delete(s.peers, addr)
		}
	}
	candidates := make([]netip.AddrPort, 0, len(s.peers)+1)
	for addr := range s.peers {
		candidates = append(candidates, addr)
	}
	if _, asked := s.peers[self]; self.IsValid() && !asked {
		candidates = append(candidates, self)
	}
	if p.IsValid() {
		s.peers[p] = now
	}
	return rendezvous.Neighbours(key, p, candidates, degree)
}

// peerTTL is how long a seeder remembers a peer that stopped asking.
const peerTTL = 2 * time.Minute

// copyAndHash copies length bytes from r into w at offset (nil w: hashes only) and returns the
// SHA-1 of every piece, as a torrent info's "pieces". It holds one piece in memory.
func copyAndHash(ctx context.Context, r io.Reader, w io.WriterAt, offset, length, pieceLength int64) ([]byte, error) {
	buf := make([]byte, pieceLength)
	pieces := make([]byte, 0, (length+pieceLength-1)/pieceLength*torrent.HashSize)
	for done := int64(0); done < length; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(pieceLength, length-done)
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			return nil, fmt.Errorf("read bytes %d-%d: %w", offset+done, offset+done+n-1, err)
		}
		if w != nil {
			if _, err := w.WriteAt(buf[:n], offset+done); err != nil {
				return nil, fmt.Errorf("write bytes %d-%d: %w", offset+done, offset+done+n-1, err)
			}
		}
		sum := sha1.Sum(buf[:n]) //nolint:gosec // see import
		pieces = append(pieces, sum[:]...)
		done += n
	}
	return pieces, nil
}

// buildInfo returns the bencoded info of segment k of p.
func buildInfo(p plan.Plan, k int, pieces []byte) ([]byte, error) {
	_, length := p.Segment(k)
	return torrent.EncodeInfo(torrent.Info{Name: p.InfoName(k), PieceLength: p.PieceLength, Pieces: pieces, Length: length})
}

// checkInfo verifies that info bytes learned from a peer describe segment k of p exactly, so a
// confused or malicious peer cannot make this node download something else.
func checkInfo(p plan.Plan, k int, infoBytes []byte) (pieces []byte, err error) {
	if len(infoBytes) > 1<<20 {
		return nil, errors.New("info too large")
	}
	info, err := torrent.DecodeInfo(infoBytes)
	if err != nil {
		return nil, err
	}
	_, length := p.Segment(k)
	switch {
	case info.Name != p.InfoName(k):
		return nil, fmt.Errorf("info names %q, want %q", info.Name, p.InfoName(k))
	case info.Length != length || info.Files != 0:
		return nil, fmt.Errorf("info describes %d bytes, want one file of %d", info.Length, length)
	case info.PieceLength != p.PieceLength:
		return nil, fmt.Errorf("info has pieces of %d, want %d", info.PieceLength, p.PieceLength)
	case len(info.Pieces) != p.Pieces(k)*torrent.HashSize:
		return nil, fmt.Errorf("info has %d piece hashes, want %d", len(info.Pieces)/torrent.HashSize, p.Pieces(k))
	}
	return info.Pieces, nil
}
