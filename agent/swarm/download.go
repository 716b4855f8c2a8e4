package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/torrent"
	"github.com/shoal-dev/shoal/agent/upstream"
)

// Source returns a store.Source that gets blob d through the swarm: the content store calls it
// once per missing blob, and it yields the blob's bytes in order as they are verified.
func (s *Swarm) Source(registry, repo string, d v1.Hash) store.Source {
	return s.SourceWithin(registry, repo, d, nil)
}

// SourceWithin is Source with the blob's segments seeded by the members among seeders only
// (all members when none of them is one, or seeders is empty): the nodes that are to hold the
// blob anyway, so that no other node spends disk on it. Every node that fetches the blob with
// the same seeders computes the same assignment; the last call's seeders hold for the blob.
func (s *Swarm) SourceWithin(registry, repo string, d v1.Hash, seeders []netip.AddrPort) store.Source {
	return func(ctx context.Context) (io.ReadCloser, int64, error) {
		size, err := s.cfg.Upstream.HeadBlob(ctx, registry, repo, d)
		if err != nil {
			return nil, 0, err
		}
		b, err := s.blobFor(d, size, registry, repo)
		if err != nil {
			return nil, 0, err
		}
		if seeders != nil {
			b.restrictSeeders(seeders)
		}
		b.downloadOnce.Do(func() {
			b.started = time.Now()
			s.background(func() { s.acquireAll(b) })
		})
		s.mu.Lock()
		path := b.path
		s.mu.Unlock()
		r := &blobReader{s: s, b: b, ctx: ctx, path: path, done: b.addReader()}
		if path == "" {
			// Handed over to the content store already (which asks again only if it has lost
			// the blob since): the bytes can be read, but there is no file to adopt.
			return plainReader{r}, size, nil
		}
		return r, size, nil
	}
}

// plainReader hides blobReader's store.FileSource methods.
type plainReader struct{ r *blobReader }

func (p plainReader) Read(b []byte) (int, error) { return p.r.Read(b) }
func (p plainReader) Close() error               { return p.r.Close() }

// acquireAll gets the torrent of every segment, asking seeders at most UpstreamWindow segments
// ahead so that early segments are fetched from upstream first.
func (s *Swarm) acquireAll(b *blob) {
	window := make(chan struct{}, s.cfg.UpstreamWindow)
	var wg sync.WaitGroup
	defer wg.Wait()
	for k := range b.segs {
		select {
		case window <- struct{}{}:
		case <-s.ctx.Done():
			for _, seg := range b.segs[k:] {
				seg.fail(fmt.Errorf("segment %d of %s: %w", k, b.plan.Digest, errSwarmClosed))
			}
			return
		}
		wg.Go(func() {
			defer func() { <-window }()
			ctx, cancel := context.WithTimeout(s.ctx, s.cfg.InfoTimeout+time.Minute)
			defer cancel()
			if err := s.acquire(ctx, b, k); err != nil {
				s.log.Warn("segment unavailable through the swarm; readers will fetch it directly", "digest", b.plan.Digest, "segment", k, "error", err)
				b.segs[k].fail(err)
			}
		})
	}
}

// acquire gets segment k's torrent: from its seeder, or by seeding it here when this node is the
// seeder or every seeder candidate failed. When upstream ignores Range, every segment's seeder
// is segment 0's (see seedWhole).
func (s *Swarm) acquire(ctx context.Context, b *blob, k int) error {
	seg := b.segs[k]
	failed := map[netip.AddrPort]bool{}
	timeouts := 0
	askedWholeAgain := false
	for {
		if info, _, _ := seg.state(); info != nil {
			return nil
		}
		whole := b.whole.Load()
		live := s.cfg.Membership.Live()
		assigned := s.seedersOf(b)
		seeder, _ := seederOf(b.plan, ownerOf(k, whole), assigned.seeders, assigned.members, func(m netip.AddrPort) bool {
			// A whole blob's seeder is left only once it failed this node: every member that
			// takes it for the whole blob's seeder fetches the blob whole, so a momentary
			// difference between nodes' views of who is alive would cost a copy of the blob.
			return !failed[m] && (whole || slices.Contains(live, m))
		})
		if !seeder.IsValid() || seeder == s.self {
			if whole {
				b.wholeHere.Store(true)
			}
			_, err := s.ensureSegment(ctx, b, k)
			if err != nil && !whole && b.whole.Load() {
				continue // found that upstream ignores Range: the whole blob's seeder now
			}
			return err
		}
		answer, err := s.requestSegment(ctx, seeder, b, k, whole)
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			if isRangeUnsupported(err) && !whole {
				s.setWhole(b, "seeder "+seeder.String()+" found it")
				continue
			}
			if isRangeUnsupported(err) && !askedWholeAgain {
				// The failure of a ranged fetch of the segment that the seeder began before
				// it was asked for the whole blob: an agent of the previous release answers
				// a whole-blob ask with it, its whole fetch under way by then. Asked again, it
				// waits for that fetch; passing it over would fetch the blob whole again.
				askedWholeAgain = true
				continue
			}
			s.metrics.seederFailures.Inc()
			switch {
			case isSeederError(err):
			case !isTimeout(err):
				s.cfg.Membership.ReportFailure(seeder)
			case timeouts < seederTimeoutsToFail && s.askAgain(ctx, b, k, seeder, err, timeouts):
				timeouts++
				select {
				case <-time.After(seederRetryPause):
				case <-ctx.Done():
					return ctx.Err()
				}
				continue
			}
			failed[seeder], timeouts = true, 0
			s.log.Info("seeder failed, trying the next one", "digest", b.plan.Digest, "segment", k, "seeder", seeder, "error", err)
			continue
		}
		if err := s.publishSegment(b, k, answer.Info, b.state); err != nil {
			return err
		}
		seg.setSource(seeder)
		s.addPeers(b, answer.Peers)
		s.background(func() { s.announce(b, k, seeder, whole, answer.Peers) })
		return nil
	}
}

// ownerOf is the segment whose seeder seeds segment k: k itself, or segment 0 when the blob is
// fetched whole (see seedWhole).
func ownerOf(k int, whole bool) int {
	if whole {
		return 0
	}
	return k
}

// setWhole records that blob b's registry ignores Range (see seedWhole).
func (s *Swarm) setWhole(b *blob, why string) {
	s.noRange.Store(b.registry, true)
	if b.whole.CompareAndSwap(false, true) {
		s.metrics.wholeBlobs.Inc()
		s.log.Warn("the registry ignores Range requests; one member fetches the whole blob for the swarm",
			"digest", b.plan.Digest, "registry", b.registry, "reason", why)
	}
}

// announce asks the seeder for fresh peers until the segment is complete here, as a tracker
// announce would; a seeder that disappears just stops being asked. The peers a seeder names
// change only while nodes join the segment, which they do within seconds of each other in a
// rollout, so the interval doubles, up to maxAnnounceInterval, each time the answer names no
// peer it has not named before (at N = 32, announcing every 2 s took 2 % of the agents' CPU).
func (s *Swarm) announce(b *blob, k int, seeder netip.AddrPort, whole bool, peers []string) {
	s.announcing.Add(1)
	defer s.announcing.Add(-1)
	t := b.t
	interval := announceInterval
	timer := time.NewTimer(interval)
	defer timer.Stop()
	named := map[string]bool{}
	for _, p := range peers {
		named[p] = true
	}
	for {
		select {
		case <-t.Complete(): // see handover
			return
		case <-t.Closed():
			return
		case <-s.ctx.Done():
			return
		case <-timer.C:
		}
		if b.segmentDone(k) {
			return
		}
		ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
		answer, err := s.requestSegment(ctx, seeder, b, k, whole)
		cancel()
		if err != nil {
			return
		}
		fresh := false
		for _, p := range answer.Peers {
			if !named[p] {
				named[p], fresh = true, true
			}
		}
		if fresh {
			interval = announceInterval
			s.addPeers(b, answer.Peers)
		} else {
			interval = min(2*interval, maxAnnounceInterval)
		}
		timer.Reset(interval)
	}
}

// segmentDone reports whether every piece of segment k is final here: verified, or read from
// upstream instead.
func (b *blob) segmentDone(k int) bool {
	first := b.plan.FirstPiece(k)
	for i := first; i < first+b.plan.Pieces(k); i++ {
		if !b.t.IsFrozen(i) && !b.t.PieceComplete(i) {
			return false
		}
	}
	return true
}

func (s *Swarm) addPeers(b *blob, peers []string) {
	addrs := make([]netip.AddrPort, 0, len(peers))
	for _, p := range peers {
		ap, err := netip.ParseAddrPort(p)
		if err != nil || ap == s.self || !s.cfg.Membership.Allowed(ap.Addr()) {
			continue
		}
		addrs = append(addrs, ap)
	}
	b.t.AddPeers(addrs)
}

// ensureSegment returns segment k's info, seeding it here if nobody has published it yet: from
// the local content store when the blob is complete there, else from upstream.
func (s *Swarm) ensureSegment(ctx context.Context, b *blob, k int) ([]byte, error) {
	seg := b.segs[k]
	for {
		info, ready, _ := seg.state()
		if info != nil {
			return info, nil
		}
		if b.whole.Load() {
			if !b.wholeHere.Load() {
				// Not this node's to fetch: the asker goes to the whole blob's seeder.
				return nil, fmt.Errorf("segment %d of %s: not the whole blob's seeder: %w", k, b.plan.Digest, upstream.ErrRangeUnsupported)
			}
			s.startWhole(b)
		} else if seg.startSeeding() && !s.background(func() { s.seed(b, k) }) {
			seg.fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.Digest, errSwarmClosed))
		}
		select {
		case <-ready:
			info, _, err := seg.state()
			if info != nil || err == nil {
				continue
			}
			if errors.Is(err, upstream.ErrRangeUnsupported) && b.whole.Load() {
				// A ranged fetch begun before the registry was found to ignore Range: the
				// next pass fetches the blob whole here, if this node is its seeder, or sends
				// the asker to the member that is. Answering with the ranged fetch's error
				// would make an asker that wants the whole blob pass this node over and have
				// the next member fetch the blob whole again.
				continue
			}
			return nil, err
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for segment %d of %s: %w", k, b.plan.Digest, ctx.Err())
		}
	}
}

// seed fetches segment k's bytes, hashes its pieces, and publishes its torrent.
func (s *Swarm) seed(b *blob, k int) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.InfoTimeout+time.Minute)
	defer cancel()
	offset, length := b.plan.Segment(k)
	start := time.Now()
	local := s.openLocal(b.plan.Digest)
	if local != nil {
		defer local.Close()
	} else {
		release, err := s.seedSlot(ctx, k)
		if err != nil {
			b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.Digest, err))
			return
		}
		defer release()
	}
	pieces, source, err := s.fetchSegment(ctx, b, local, offset, length)
	if err != nil {
		if errors.Is(err, upstream.ErrRangeUnsupported) {
			s.setWhole(b, "a ranged fetch of segment "+strconv.Itoa(k)+" got the whole blob")
		}
		b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.Digest, err))
		return
	}
	s.metrics.bytes.WithLabelValues(source).Add(float64(length))
	info, err := buildInfo(b.plan, k, pieces)
	if err == nil {
		if err = s.publishSegment(b, k, info, torrent.AllComplete); err == nil {
			s.log.Info("seeding segment", "digest", b.plan.Digest, "segment", k, "from", source,
				"bytes", length, "duration", time.Since(start))
			return
		}
	}
	b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.Digest, err))
}

// fetchSegment returns a segment's piece hashes, with its bytes in the blob's file: from local,
// the complete blob in the content store, when there is one (the torrent then reads the store's
// copy), else copied from upstream, as several
// ranges at once: more TCP flows take a larger share of a downlink that peers are also using,
// and each flow's round trips overlap.
func (s *Swarm) fetchSegment(ctx context.Context, b *blob, local store.Blob, offset, length int64) ([]byte, string, error) {
	if local != nil {
		// The store holds the whole blob, verified: the torrent serves it from there (once
		// handed over), so the segment is only hashed, never copied into a working file.
		if !s.handedOver(b) {
			s.handover(b)
		}
		pieces, err := copyAndHash(ctx, io.NewSectionReader(local, offset, length), nil, offset, length, b.plan.PieceLength)
		return pieces, sourceLocal, err
	}
	pieceLength := b.plan.PieceLength
	nPieces := (length + pieceLength - 1) / pieceLength
	streams := min(int64(upstreamStreams), nPieces)
	perStream := (nPieces + streams - 1) / streams * pieceLength
	pieces := make([]byte, nPieces*torrent.HashSize)
	errs := make(chan error, streams)
	for i := range streams {
		start := i * perStream
		if start >= length {
			errs <- nil
			continue
		}
		n := min(perStream, length-start)
		go func() {
			rc, _, err := s.cfg.Upstream.Blob(ctx, b.registry, b.repo, b.plan.Digest, offset+start, n)
			if err != nil {
				errs <- err
				return
			}
			defer rc.Close()
			hashes, err := copyAndHash(ctx, rc, b.file, offset+start, n, pieceLength)
			if err == nil {
				copy(pieces[start/pieceLength*torrent.HashSize:], hashes)
			}
			errs <- err
		}()
	}
	var first error
	for range streams {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return pieces, sourceUpstream, first
}

// upstreamStreams is how many ranges of a segment are fetched from upstream at once.
const upstreamStreams = 4

// startWhole starts seedWhole for blob b unless it is running.
func (s *Swarm) startWhole(b *blob) {
	b.wholeMu.Lock()
	defer b.wholeMu.Unlock()
	if b.wholeRunning {
		return
	}
	if b.wholeRunning = s.background(func() { s.seedWhole(b) }); !b.wholeRunning {
		for _, seg := range b.segs {
			seg.fail(fmt.Errorf("seed %s whole: %w", b.plan.Digest, errSwarmClosed))
		}
	}
}

// seedWhole fetches a blob whose registry ignores Range in one request from its start and
// publishes each segment as its bytes arrive, so the swarm trades the early segments while the
// later ones are still coming: the registry still sends the blob once. It is segment 0's seeder
// that does it for the cluster (see acquire). A segment already published here (learned from a
// peer before the registry was found to ignore Range) is skipped over.
func (s *Swarm) seedWhole(b *blob) {
	start := time.Now()
	var err error
	defer func() {
		b.wholeMu.Lock()
		b.wholeRunning = false
		b.wholeMu.Unlock()
		if err == nil {
			return
		}
		for _, seg := range b.segs {
			seg.fail(fmt.Errorf("seed %s whole: %w", b.plan.Digest, err))
		}
	}()
	var rc io.ReadCloser
	if local := s.openLocal(b.plan.Digest); local != nil {
		rc = local
	} else if rc, _, err = s.cfg.Upstream.Blob(s.ctx, b.registry, b.repo, b.plan.Digest, 0, -1); err != nil {
		return
	}
	defer rc.Close()
	source := sourceUpstream
	if _, ok := rc.(store.Blob); ok {
		source = sourceLocal
	}
	for k, seg := range b.segs {
		offset, length := b.plan.Segment(k)
		var pieces, info []byte
		if pieces, err = copyAndHash(s.ctx, rc, b.file, offset, length, b.plan.PieceLength); err != nil {
			err = fmt.Errorf("segment %d: %w", k, err)
			return
		}
		s.metrics.bytes.WithLabelValues(source).Add(float64(length))
		if known, _, _ := seg.state(); known != nil {
			// Learned from a peer meanwhile (another member took itself for the whole blob's
			// seeder too): its pieces are here now all the same. Skipping them could leave a
			// piece that neither had.
			b.completePieces(k, pieces)
			continue
		}
		if info, err = buildInfo(b.plan, k, pieces); err == nil {
			err = s.publishSegment(b, k, info, torrent.AllComplete)
		}
		if err != nil {
			return
		}
	}
	s.log.Info("seeding whole blob", "digest", b.plan.Digest, "from", source, "bytes", b.plan.Size, "duration", time.Since(start))
}

// retriesAfter is how many times in a row a seeder that timed out is asked again before the
// next one is: a dial that timed out proves little (a saturated drop-tail link drops SYNs, and
// Linux sends the next one a second later), but a seeder that accepted the connection and then
// said nothing (no headers, or no heartbeat) is stopped or wedged, and is asked once more only.
func retriesAfter(err error) int {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return seederTimeoutsToFail
	}
	return 1
}

// askAgain reports whether a seeder whose request timed out (timeouts times in a row before) is
// asked again rather than passed over, for the next seeder would fetch the segment from upstream
// a second time. Only while the probes find it live: after a dial that timed out, up to
// retriesAfter times (a congested link drops SYNs, and the retry comes a second later); after
// it accepted the request and said nothing, once, and then only while it shows life (busy, not
// wedged: on saturated links a lost packet of the request or of its answer costs a
// retransmission).
func (s *Swarm) askAgain(ctx context.Context, b *blob, k int, seeder netip.AddrPort, err error, timeouts int) bool {
	switch {
	case !slices.Contains(s.cfg.Membership.Live(), seeder):
		return false
	case timeouts < retriesAfter(err):
		s.log.Debug("seeder slow to answer, asking again", "digest", b.plan.Digest, "segment", k, "seeder", seeder, "error", err)
		return true
	case s.alive(ctx, seeder, busyPingTimeout) == nil:
		s.metrics.seederBusy.Inc()
		s.log.Debug("seeder busy, asking again", "digest", b.plan.Digest, "segment", k, "seeder", seeder, "error", err)
		return true
	}
	return false
}

// alive returns nil if peer shows life: it sent this node data within rescuePingTimeout (busy,
// not stopped: a ping may time out on a machine whose CPU a rollout saturates), or it answers a
// ping within timeout; else the ping's error.
func (s *Swarm) alive(ctx context.Context, peer netip.AddrPort, timeout time.Duration) error {
	if s.heardWithin(peer.Addr(), rescuePingTimeout) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return s.ping(ctx, peer)
}

// busyPingTimeout bounds the ping that tells a busy seeder from a wedged one (askAgain). It adds
// to the time a node takes to leave a seeder that accepts connections and says nothing, so it is
// shorter than rescuePingTimeout.
const busyPingTimeout = time.Second

// rescue runs when a reader waits for a piece of segment k that does not come: if the member
// the segment's info came from is banned (it sent bad data), or does not answer a ping, it is
// taken as stopped (its pieces stop
// counting, see holders), and every segment of the blob that it published here is seeded again,
// each by the next member by rank, from upstream, for everyone (this node included, when that
// is it). Only the pieces that no live peer holds are fetched again: one copy of what the
// stopped member alone had, instead of one per reader that would read it directly.
func (s *Swarm) rescue(b *blob, k int) {
	seg := b.segs[k]
	source, ok := seg.beginRescue(time.Now(), kickAfter(s.cfg.StallTimeout), netip.AddrPort{})
	if !ok {
		return
	}
	started := s.background(func() {
		var err error
		switch {
		case s.client.IsBanned(source.Addr()):
			// It sent bad data: whatever it holds is of no use.
			err = errors.New("banned for sending bad data")
		default:
			// A false rescue costs upstream bytes.
			if err = s.alive(s.ctx, source, rescuePingTimeout); err == nil {
				seg.endRescue(false, netip.AddrPort{})
				return // alive: its pieces come, or the late-piece rule reads them
			}
		}
		s.markSilent(source.Addr())
		s.log.Warn("a seeder does not answer; the next members seed its segments again",
			"digest", b.plan.Digest, "segment", k, "seeder", source, "error", err)
		if !s.background(func() { s.reseed(b, k, source) }) {
			seg.endRescue(false, netip.AddrPort{})
			return
		}
		for other, os := range b.segs {
			if other == k || b.segmentDone(other) {
				continue
			}
			if _, ok := os.beginRescue(time.Now(), 0, source); ok && !s.background(func() { s.reseed(b, other, source) }) {
				os.endRescue(false, netip.AddrPort{})
			}
		}
	})
	if !started {
		seg.endRescue(false, netip.AddrPort{})
	}
}

// reseed has segment k, published here by stopped, seeded again by the next member by rank, and
// ends the rescue begun on it.
func (s *Swarm) reseed(b *blob, k int, stopped netip.AddrPort) {
	seg := b.segs[k]
	moved, next := false, netip.AddrPort{}
	defer func() { seg.endRescue(moved, next) }()
	s.metrics.rescues.Inc()
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.InfoTimeout)
	defer cancel()
	whole := b.whole.Load()
	failed := map[netip.AddrPort]bool{stopped: true}
	for ctx.Err() == nil {
		live := s.cfg.Membership.Live()
		assigned := s.seedersOf(b)
		seeder, found := seederOf(b.plan, ownerOf(k, whole), assigned.seeders, assigned.members, func(m netip.AddrPort) bool {
			return !failed[m] && !s.isSilent(m.Addr()) && slices.Contains(live, m)
		})
		if !found || seeder == s.self {
			if err := s.refetchSegment(ctx, b, k); err != nil {
				s.log.Warn("cannot seed a segment again", "digest", b.plan.Digest, "segment", k, "error", err)
				return
			}
			moved = true
			return
		}
		req := s.segmentRequestFor(b, k, whole)
		req.Reseed = true
		answer, err := s.requestSegmentV2(ctx, seeder, req)
		if err == nil && answer.Error == "" {
			s.addPeers(b, answer.Peers)
			moved, next = true, seeder
			return
		}
		failed[seeder] = true
	}
}

// rescuePingTimeout bounds the ping that decides whether a segment's seeder is stopped. A live
// agent answers in milliseconds; at 32 nodes on two saturated cores a ping of 1 s timed out once
// per rollout or so, and rescued a segment for nothing.
const rescuePingTimeout = 2 * time.Second

// refetchSegment fetches again, from the local store or upstream, the pieces of segment k that
// are neither here nor held by a live connected peer, for a segment whose info is known but
// whose seeder stopped: those that match their hashes become complete, and the torrent trades
// them. The others come from the peers that hold them.
func (s *Swarm) refetchSegment(ctx context.Context, b *blob, k int) error {
	seg := b.segs[k]
	seg.refetchMu.Lock()
	defer seg.refetchMu.Unlock()
	first, n := b.plan.FirstPiece(k), b.plan.Pieces(k)
	var runs [][2]int // [from, to) of pieces nobody can send
	for i := first; i < first+n; i++ {
		if b.t.IsFrozen(i) || b.t.PieceComplete(i) || b.holders(i) > 0 {
			continue
		}
		if len(runs) > 0 && runs[len(runs)-1][1] == i {
			runs[len(runs)-1][1] = i + 1
		} else {
			runs = append(runs, [2]int{i, i + 1})
		}
	}
	if len(runs) == 0 {
		return nil
	}
	local := s.openLocal(b.plan.Digest)
	if local != nil {
		defer local.Close()
	} else {
		release, err := s.seedSlot(ctx, k)
		if err != nil {
			return err
		}
		defer release()
	}
	segOffset, segLength := b.plan.Segment(k)
	pl := b.plan.PieceLength
	var fetched int64
	source := sourceUpstream
	for _, run := range runs {
		offset := int64(run[0]) * pl
		length := min(int64(run[1])*pl, segOffset+segLength) - offset
		var pieces []byte
		var err error
		if local != nil {
			pieces, source, err = s.fetchSegment(ctx, b, local, offset, length)
		} else {
			var rc io.ReadCloser
			if rc, err = s.openUpstream(ctx, b, offset, length); err == nil {
				pieces, err = copyAndHash(ctx, rc, b.file, offset, length, pl)
				_ = rc.Close()
			}
		}
		if err != nil {
			return fmt.Errorf("fetch pieces %d-%d of %s again: %w", run[0], run[1]-1, b.plan.Digest, err)
		}
		s.metrics.bytes.WithLabelValues(source).Add(float64(length))
		fetched += length
		for j := range run[1] - run[0] {
			b.t.CompleteIfHash(run[0]+j, pieces[j*torrent.HashSize:(j+1)*torrent.HashSize])
		}
	}
	s.log.Info("seeded a segment again", "digest", b.plan.Digest, "segment", k, "from", source, "bytes", fetched, "of", segLength)
	return nil
}

// markSilent makes a peer's pieces stop counting for a while (see holders): it did not answer
// a ping, so its connections are stuck, whatever they claim to have.
func (s *Swarm) markSilent(addr netip.Addr) {
	s.silent.Store(addr.Unmap(), time.Now().Add(silentFor))
}

func (s *Swarm) isSilent(addr netip.Addr) bool {
	v, ok := s.silent.Load(addr.Unmap())
	if !ok {
		return false
	}
	if until, ok := v.(time.Time); !ok || time.Now().After(until) {
		s.silent.Delete(addr.Unmap())
		return false
	}
	return true
}

// silentFor is how long a peer that did not answer a ping stays silent.
const silentFor = 30 * time.Second

// openUpstream opens bytes [offset, offset+length) of b from upstream. From a registry that
// ignores Range it asks for the whole blob, discards its way to offset and closes after length
// bytes: costly, but only readers that the swarm could not serve get there.
func (s *Swarm) openUpstream(ctx context.Context, b *blob, offset, length int64) (io.ReadCloser, error) {
	if !b.whole.Load() {
		rc, _, err := s.cfg.Upstream.Blob(ctx, b.registry, b.repo, b.plan.Digest, offset, length)
		if !errors.Is(err, upstream.ErrRangeUnsupported) {
			return rc, err
		}
		s.setWhole(b, "a direct read got the whole blob")
	}
	s.log.Info("reading from upstream past the start of a blob whose registry ignores Range",
		"digest", b.plan.Digest, "offset", offset, "length", length)
	rc, _, err := s.cfg.Upstream.Blob(ctx, b.registry, b.repo, b.plan.Digest, 0, -1)
	if err != nil {
		return nil, err
	}
	if _, err := io.CopyN(io.Discard, rc, offset); err != nil {
		_ = rc.Close()
		return nil, fmt.Errorf("skip to byte %d: %w", offset, err)
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(rc, length), rc}, nil
}

// openLocal opens blob d in the content store if it is complete there, else returns nil.
func (s *Swarm) openLocal(d v1.Hash) store.Blob {
	if s.cfg.Local == nil {
		return nil
	}
	local, err := s.cfg.Local.Get(d)
	if err != nil {
		return nil
	}
	return local
}

// addTorrent adds b's torrent, stored in the blob's file. It trades no piece until the hashes
// of the piece's segment are known here (see publishSegment).
func (s *Swarm) addTorrent(b *blob) error {
	t, err := s.client.AddBlob(b.plan.Digest.Hex, b.plan.Size, b.plan.PieceLength, b.file, func(err error) {
		s.log.Error("cannot write blob data; dropping the blob's torrent", "digest", b.plan.Digest, "error", err)
	})
	if err != nil {
		return err
	}
	b.t = t
	return nil
}

// publishSegment records segment k's info, checked against the plan: its piece hashes go to the
// blob's storage in the given state, and the torrent trades those pieces from then on.
func (s *Swarm) publishSegment(b *blob, k int, info []byte, state torrent.CompletionState) error {
	if known, _, _ := b.segs[k].state(); known != nil {
		// Published already, from another source: an answer that crossed this node's own
		// publication, say. Its pieces stay as they are.
		return nil
	}
	pieces, err := checkInfo(b.plan, k, info)
	if err != nil {
		return fmt.Errorf("segment %d of %s: %w", k, b.plan.Digest, err)
	}
	first, n := b.plan.FirstPiece(k), b.plan.Pieces(k)
	b.t.SetHashes(first, pieces, state)
	if state != torrent.AllComplete {
		b.t.SetPriority(first, first+n, torrent.PriorityNormal)
	}
	b.segs[k].publish(info)
	return nil
}

// completePieces marks the pieces of segment k complete whose bytes, now in the blob's file,
// have the hashes the segment's published info gives them.
func (b *blob) completePieces(k int, pieces []byte) {
	first := b.plan.FirstPiece(k)
	for j := range b.plan.Pieces(k) {
		b.t.CompleteIfHash(first+j, pieces[j*torrent.HashSize:(j+1)*torrent.HashSize])
	}
}

// raiseAhead gives the pieces of the prioritySegments segments after the reader's a high
// priority, so that the reader finds them there when it gets to them (see prioritySegments).
func (r *blobReader) raiseAhead() {
	for k := r.k + 1; k <= r.k+prioritySegments && k < len(r.b.segs); k++ {
		first := r.b.plan.FirstPiece(k)
		r.b.t.RaisePriority(first, first+r.b.plan.Pieces(k), torrent.PriorityHigh)
	}
}

// setFocus records the horizon reader r needs (h < 0: none) and stops this node's downloads of
// the blob's pieces from the furthest horizon of its focused readers on; with none, every piece
// is fetched.
func (b *blob) setFocus(r *blobReader, h int) {
	b.focusMu.Lock()
	defer b.focusMu.Unlock()
	if h < 0 {
		if _, ok := b.focus[r]; !ok {
			return
		}
		delete(b.focus, r)
	} else {
		if b.focus == nil {
			b.focus = map[*blobReader]int{}
		}
		b.focus[r] = h
	}
	horizon := int((b.plan.Size + b.plan.PieceLength - 1) / b.plan.PieceLength) // every piece
	if len(b.focus) > 0 {
		horizon = 0
		for _, h := range b.focus {
			horizon = max(horizon, h)
		}
	}
	b.t.SetHorizon(horizon)
}

// peerHas reports whether a connected peer that is not silent has piece i.
func (b *blob) peerHas(i int) bool { return b.holders(i) > 0 }

// holders counts the connected peers that have piece i, leaving out those that did not answer a
// ping (stopped, whatever they claim to have: see Swarm.rescue).
func (b *blob) holders(i int) int { return b.t.Holders(i, b.silent) }

// pieceReport describes piece i for a log.
func (b *blob) pieceReport(i int) slog.Attr { return b.t.PieceReport(i, b.silent) }

// takeOverPieces stops the blob's torrent from writing or requesting pieces [from, to) for good,
// when this node reads their bytes from upstream instead: no chunk still in flight lands on them.
func (b *blob) takeOverPieces(from, to int) { b.t.Freeze(from, to) }

// readaheadPieces is how many pieces from the reader's position are fetched with priority. With
// the request window held (requestwindow.go) and pieces nobody asked for kicked (blob.kick), 0
// and 2 measured the same at N = 32 (cold p99 1.50 both, warm 1.41 and 1.43) and 2 was better at
// N = 8 (cold 1.13 against 1.17, warm 1.09 against 1.16). Before those two fixes 0 served the
// swarm better but left a lone reader waiting 20 s for its piece.
const readaheadPieces = 2

// focusAfter is how long a reader waits for a piece that at most focusHolders connected peers
// have, while the blob's other pieces keep coming, before this node fetches nothing else until
// the piece is here; it does the same while it reads a late piece from upstream (see step). On a
// full downlink such a piece gets the share of one or two flows among all of the node's: a node
// alone in reading a new blob fetches every segment from its seeder at once, and at N = 32,
// 25 Mbit/s, 256 MiB a reader had 23 MiB when its node had 148, waited 20 s for one piece, and
// the upstream read of that piece, beside the same flows, did not end before the content store
// gave up on the download (30 s without a byte). A piece that many peers have gets its chunks
// from several of them; there, holding a node's other downloads back, even for one piece after
// 5 s, made the slowest nodes of a busy swarm slower (N = 16, 50 Mbit/s, 256 MiB cold: p99
// 1.23-1.37 × S/B against 1.18-1.20; docs/design-notes.md).
func focusAfter(stallTimeout time.Duration) time.Duration { return stallTimeout }

// focusHolders: see focusAfter.
const focusHolders = 2

// kickAfter is how long a reader waits for a piece of which no byte has come, although a
// connected peer has it, before it kicks the piece (see blob.kick), and again between kicks.
func kickAfter(stallTimeout time.Duration) time.Duration { return stallTimeout / 5 }

// prioritySegments is how many segments after the reader's have their pieces fetched with high
// priority (above the rest, below the reader's own pieces). Otherwise pieces come rarest first
// from anywhere in the blob, and at N = 32 the readers, each waiting for the next piece in
// order, had a tenth of the blob when their nodes had 90 % of it: the content store's and the
// runtime's SHA-256 of most of the blob ran after the links went quiet, 0.25 × S/B. With 2, N =
// 32 cold p99 1.38 against 1.48-1.50, warm 1.28-1.33 against 1.41-1.43, N = 8 cold 1.09 against
// 1.13, warm 0.97 against 1.09; but N = 16 warm 1.42-1.52 against 1.21-1.24: there node 0
// holds every piece, the readers ask it for the pieces they want in order (which others hold
// too), and the pieces of the segments it seeded from its store, which nobody else has, come
// last, from node 0 alone (swarm.md, "In-order delivery and the end of a rollout").
const prioritySegments = 2

// pausedPoll is how often a reader checks whether paused peer downloads have resumed.
const pausedPoll = 50 * time.Millisecond

// blobReader follows a blob in order, segment after segment, as its bytes become final in the
// blob's file: verified pieces of the blob's torrent, or, for a segment the swarm cannot deliver
// (no info, or no progress for StallTimeout), bytes read from upstream and written there
// directly. It is a store.FileSource, so the content store hashes the blob in that file and
// then adopts it instead of copying it; either way the store verifies the whole blob's digest.
type blobReader struct {
	s    *Swarm
	b    *blob
	ctx  context.Context
	path string // the blob's file

	final  int64         // bytes from the blob's start that are final in the file
	read   int64         // bytes Read has returned
	k      int           // the segment holding byte final
	open   bool          // segment k's info is known and reader is positioned in it
	reader pieceReader   // of the blob's pieces, while following the swarm
	direct io.ReadCloser // the rest of segment k from upstream, when the swarm could not deliver it
	probe  [1]byte
	done   func() // tells the blob this reader is gone
}

var _ store.FileSource = (*blobReader)(nil)

// FilePath implements store.FileSource.
func (r *blobReader) FilePath() string { return r.path }

// Advance implements store.FileSource: it blocks until more than have bytes are final.
func (r *blobReader) Advance(ctx context.Context, have int64) (int64, error) {
	for r.final <= have && r.final < r.b.plan.Size {
		if err := r.step(ctx); err != nil {
			return r.final, err
		}
	}
	if r.final >= r.b.plan.Size {
		r.s.finished(r.b)
	}
	return r.final, nil
}

// Read implements io.Reader for callers other than the content store: it reads the file as
// Advance makes it final.
func (r *blobReader) Read(p []byte) (int, error) {
	if r.read >= r.b.plan.Size {
		r.s.finished(r.b)
		return 0, io.EOF
	}
	if r.read >= r.final {
		if _, err := r.Advance(r.ctx, r.read); err != nil {
			return 0, err
		}
	}
	n, err := r.b.file.ReadAt(p[:min(int64(len(p)), r.final-r.read)], r.read)
	r.read += int64(n)
	if errors.Is(err, io.EOF) && n > 0 {
		err = nil
	}
	return n, err
}

// step makes at least one more byte final: the run of verified pieces starting at final, or a
// block read from upstream.
func (r *blobReader) step(ctx context.Context) error {
	if r.s.handedOver(r.b) {
		// The blob's file is the content store's verified copy now (this node seeded a segment
		// of it from there): every byte is final.
		r.closeSegment()
		r.closeReader()
		if r.direct != nil {
			_ = r.direct.Close()
			r.direct = nil
		}
		r.final = r.b.plan.Size
		return nil
	}
	offset, length := r.b.plan.Segment(r.k)
	segPos := r.final - offset
	if segPos >= length {
		r.closeSegment()
		r.k++
		return nil
	}
	if !r.open && r.direct == nil {
		if err := r.openSegment(ctx, segPos); err != nil {
			return err
		}
	}
	if r.direct != nil {
		return r.copyDirect(segPos)
	}
	t := r.b.t
	var n int
	var err error
	var idle bool
	blocked := time.Now()
	progressed, completed := blocked, t.BytesCompleted() // the blob's last verified piece
	startCompleted := completed
	kicked := blocked
	piece := int((offset + segPos) / r.b.plan.PieceLength)
	focused := false
	focus := func(why string, waited time.Duration) {
		focused = true
		r.b.setFocus(r, piece+readaheadPieces+1)
		r.s.metrics.focuses.Inc()
		r.s.log.Info("reader focused: fetching only the piece it waits for", "digest", r.b.plan.Digest,
			"segment", r.k, "reason", why, "waited", waited, "pieces_complete", t.Stats().PiecesComplete, r.b.pieceReport(piece))
	}
	defer func() {
		if focused {
			r.b.setFocus(r, -1)
		}
	}()
	for {
		// Reading one byte waits for the piece holding it to be verified; the reader also makes
		// the pieces just ahead of it urgent. The swarm is stalled when the blob completes no
		// piece for StallTimeout (unless this node paused its downloads to fetch a segment from
		// upstream). The piece waited for is late when no connected peer has it after
		// StallTimeout, or when the reader has waited twice that long in all (the content store
		// gives up on a download that delivers nothing for longer). The wait is cut into slices
		// to look at the blob's progress in between.
		wasSeeding, pausesBefore := r.s.pauseState()
		wctx, cancel := context.WithTimeout(ctx, r.s.waitSlice())
		n, err = r.reader.ReadContext(wctx, r.probe[:])
		cancel()
		isSeeding, pausesAfter := r.s.pauseState()
		seeding := wasSeeding || isSeeding || pausesAfter != pausesBefore
		if n == 0 && err != nil && seeding && ctx.Err() == nil && time.Since(blocked) < 2*r.s.cfg.StallTimeout {
			// The torrent reader fails at once while downloads are paused: wait for the resume.
			select {
			case <-time.After(pausedPoll):
				progressed = time.Now()
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if n > 0 || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			break
		}
		now := time.Now()
		c := t.BytesCompleted()
		if c != completed || seeding {
			progressed, completed = now, c
		}
		idle = now.Sub(progressed) >= r.s.cfg.StallTimeout
		waited := now.Sub(blocked)
		held := r.b.peerHas(piece)
		if !focused && !seeding && held && waited >= focusAfter(r.s.cfg.StallTimeout) &&
			c-startCompleted >= 2*r.b.plan.PieceLength && r.b.holders(piece) <= focusHolders {
			// The node's downlink is busy with other pieces and the one the reader needs crawls
			// in beside them from its only holders: fetch nothing else until it is here.
			focus("the piece crawls in beside others", waited)
		}
		r.raiseAhead()
		if !seeding && held && now.Sub(kicked) >= kickAfter(r.s.cfg.StallTimeout) && !t.PiecePartial(piece) {
			// Not a byte of the piece in all that time although a connected peer has it: maybe
			// nobody asked for it.
			if r.b.t.Kick(piece) {
				r.s.metrics.kicks.Inc()
				r.s.log.Debug("kicked a piece nobody sent", "digest", r.b.plan.Digest, "segment", r.k, "waited", waited, r.b.pieceReport(piece))
			}
			kicked = now
		}
		if !seeding && waited >= kickAfter(r.s.cfg.StallTimeout) {
			// The piece has not come in all that time: maybe its segment's seeder is stopped.
			r.s.rescue(r.b, r.k)
		}
		if idle || waited >= 2*r.s.cfg.StallTimeout || (waited >= r.s.cfg.StallTimeout && !held) {
			break
		}
	}
	if n > 0 {
		// The piece at segPos is verified; so may be the ones after it.
		pl := r.b.plan.PieceLength
		end := min(((offset+segPos)/pl+1)*pl, offset+length)
		for i := int(end / pl); end < offset+length && t.PieceComplete(i); i++ {
			end = min(end+pl, offset+length)
		}
		r.final = end
		if _, err := r.reader.Seek(end, io.SeekStart); err != nil {
			return fmt.Errorf("seek segment %d: %w", r.k, err)
		}
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("segment %d of %s: torrent ended at %d of %d bytes: %w", r.k, r.b.plan.Digest, segPos, length, io.ErrUnexpectedEOF)
	}
	stats := t.Stats()
	if !idle && errors.Is(err, context.DeadlineExceeded) {
		r.s.metrics.stalls.WithLabelValues(stallLatePiece).Inc()
		// The segment progresses but the piece the reader needs does not come: read that piece
		// alone from upstream and go on with the swarm.
		r.s.log.Info("piece late in the swarm; reading it from upstream",
			"digest", r.b.plan.Digest, "segment", r.k, "at", segPos, "pieces_complete", stats.PiecesComplete, "peer_conns", stats.PeerConns, r.b.pieceReport(piece))
		if !focused {
			// The upstream read shares the downlink with the pieces the node fetches from its
			// peers; it has until the content store's stall limit to end.
			focus("the piece is read from upstream", time.Since(blocked))
		}
		return r.copyPiece(ctx, segPos)
	}
	// The swarm made no progress: read the rest of this segment from upstream.
	r.s.metrics.stalls.WithLabelValues(stallNoProgress).Inc()
	r.s.log.Warn("segment stalled in the swarm; reading the rest from upstream",
		"digest", r.b.plan.Digest, "segment", r.k, "at", segPos, "error", err,
		"peers_known", stats.PeersKnown, "peers_active", stats.PeersActive, "seeders", stats.Seeders,
		"half_open", stats.HalfOpen, "pieces_complete", stats.PiecesComplete, "peer_conns", stats.PeerConns, r.b.pieceReport(piece))
	return r.openDirect(ctx, segPos)
}

// copyPiece reads the rest of the piece at segPos from upstream into the blob's file, after
// stopping the segment's torrent from writing or requesting that piece, and moves the torrent
// reader past it.
func (r *blobReader) copyPiece(ctx context.Context, segPos int64) error {
	offset, length := r.b.plan.Segment(r.k)
	pl := r.b.plan.PieceLength
	i := int((offset + segPos) / pl)
	end := min(int64(i+1)*pl-offset, length)
	r.b.takeOverPieces(i, i+1)
	rc, err := r.s.openUpstream(ctx, r.b, offset+segPos, end-segPos)
	if err != nil {
		return fmt.Errorf("read piece %d of segment %d of %s from upstream: %w", i, r.k, r.b.plan.Digest, err)
	}
	r.direct = rc
	defer func() {
		r.direct = nil
		_ = rc.Close()
	}()
	for r.final < offset+end {
		if err := r.copyDirect(r.final - offset); err != nil {
			return err
		}
	}
	if _, err := r.reader.Seek(offset+end, io.SeekStart); err != nil {
		return fmt.Errorf("seek segment %d: %w", r.k, err)
	}
	return nil
}

// openSegment waits for segment k's info and positions the torrent reader at segPos.
func (r *blobReader) openSegment(ctx context.Context, segPos int64) error {
	seg := r.b.segs[r.k]
	// As long as a piece may be late (see step): the content store gives up on a source silent
	// for 30 s, and a seeder that takes longer is dead or its upstream is.
	wctx, cancel := context.WithTimeout(ctx, min(r.s.cfg.InfoTimeout, 2*r.s.cfg.StallTimeout))
	defer cancel()
	for {
		info, ready, err := seg.state()
		if info != nil {
			if r.reader == nil {
				// Never SetResponsive: a responsive reader returns chunks before their piece is
				// verified, and only verified bytes may leave the swarm.
				// The piece the reader waits for comes first (see readaheadPieces).
				r.reader = r.b.t.NewReader(r.ctx, readaheadPieces*r.b.plan.PieceLength)
			}
			r.raiseAhead()
			offset, _ := r.b.plan.Segment(r.k)
			if _, err := r.reader.Seek(offset+segPos, io.SeekStart); err != nil {
				return fmt.Errorf("seek segment %d: %w", r.k, err)
			}
			r.open = true
			return nil
		}
		if err != nil && !isRangeUnsupported(err) {
			return r.openDirect(ctx, segPos)
		}
		// (A seeder that found the registry ignores Range is no reason to go to upstream
		// directly: the segment comes from the whole blob's seeder next.)
		select {
		case <-ready:
		case <-wctx.Done():
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return r.openDirect(ctx, segPos)
		}
	}
}

// openDirect starts reading the rest of segment k, from segPos, straight from upstream. The
// torrent stops trading the segment first, so that no chunk from a peer lands on bytes from
// upstream.
func (r *blobReader) openDirect(ctx context.Context, segPos int64) error {
	r.closeSegment()
	r.closeReader()
	first := r.b.plan.FirstPiece(r.k)
	r.b.takeOverPieces(first, first+r.b.plan.Pieces(r.k))
	offset, length := r.b.plan.Segment(r.k)
	rc, err := r.s.openUpstream(ctx, r.b, offset+segPos, length-segPos)
	if err != nil {
		return fmt.Errorf("read segment %d of %s from upstream: %w", r.k, r.b.plan.Digest, err)
	}
	r.direct = rc
	return nil
}

// copyDirect copies the next block of segment k from upstream into the blob's file.
func (r *blobReader) copyDirect(segPos int64) error {
	offset, length := r.b.plan.Segment(r.k)
	bufp, _ := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bufp)
	buf := (*bufp)[:min(int64(len(*bufp)), length-segPos)]
	n, err := io.ReadAtLeast(r.direct, buf, 1)
	if n > 0 {
		if _, werr := r.b.file.WriteAt(buf[:n], offset+segPos); werr != nil {
			return fmt.Errorf("segment %d of %s: write bytes from upstream: %w", r.k, r.b.plan.Digest, werr)
		}
		r.final += int64(n)
		r.s.metrics.bytes.WithLabelValues(sourceUpstream).Add(float64(n))
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		if segPos+int64(n) < length {
			return fmt.Errorf("segment %d of %s: upstream ended early: %w", r.k, r.b.plan.Digest, io.ErrUnexpectedEOF)
		}
		err = nil
	}
	return err
}

// copyBuffers are the buffers of copies from upstream into a blob's file.
var copyBuffers = sync.Pool{New: func() any {
	b := make([]byte, 256<<10)
	return &b
}}

// closeSegment leaves segment k.
func (r *blobReader) closeSegment() {
	r.open = false
	if r.direct != nil {
		_ = r.direct.Close()
		r.direct = nil
	}
}

// closeReader closes the torrent reader, whose readahead would otherwise keep asking for pieces.
func (r *blobReader) closeReader() {
	if r.reader != nil {
		_ = r.reader.Close()
		r.reader = nil
	}
}

// Close implements io.Closer; the torrent keeps seeding for the other nodes.
func (r *blobReader) Close() error {
	r.closeSegment()
	r.closeReader()
	r.done()
	return nil
}

// finished records a blob read to its end and hands its data over to the content store.
func (s *Swarm) finished(b *blob) {
	b.finishOnce.Do(func() {
		if !b.started.IsZero() {
			s.metrics.completion.Observe(time.Since(b.started).Seconds())
		}
		st := b.t.Stats()
		read, wasted, written := st.PeerBytesRead, st.ChunksWasted, st.BytesWritten
		s.log.Info("blob delivered", "digest", b.plan.Digest, "duration", time.Since(b.started),
			"peer_bytes", read, "wasted_chunks", wasted, "uploaded_bytes", written)
	})
}

// Committed implements store.Committer: the content store has moved the blob's working file
// into itself (err nil), or given the download up. A download given up before its end (its
// client went away, it stalled) keeps its swarm state: it may be resumed, and the janitor
// retires it if nobody does.
func (r *blobReader) Committed(err error) {
	switch {
	case err == nil:
		r.s.handover(r.b)
	case r.final >= r.b.plan.Size:
		// Delivered whole but not kept (its digest did not match, or the store could not
		// write it): nothing of it can be trusted or kept.
		r.s.log.Warn("the content store did not keep a blob the swarm delivered; dropping it from the swarm", "digest", r.b.plan.Digest, "error", err)
		r.s.drop(r.b)
	}
}

var _ store.Committer = (*blobReader)(nil)

// handedOver reports whether b's torrent is served from the content store's copy. Readers ask
// at every step: an atomic, not the swarm's lock.
func (s *Swarm) handedOver(b *blob) bool { return b.handedOver.Load() }

// handover serves a blob's torrent from the content store's copy, which the store has just
// committed, and deletes the working file if it is still there, so a blob is kept on disk once.
func (s *Swarm) handover(b *blob) {
	if s.cfg.Local == nil {
		return
	}
	local, err := s.cfg.Local.Get(b.plan.Digest)
	if err != nil {
		s.log.Warn("a blob the content store committed is not there; dropping it from the swarm", "digest", b.plan.Digest, "error", err)
		s.drop(b)
		return
	}
	b.file.Swap(local, nil, local)
	b.handedOver.Store(true)
	// Verified whole: pieces read from upstream are seeded too, and the torrent is complete,
	// which ends the segments' announces.
	b.t.MarkVerified()
	s.mu.Lock()
	path := b.path
	b.path = ""
	s.mu.Unlock()
	if path != "" {
		// The store normally moved the file into itself (see store.FileSource).
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("cannot remove a swarm working file", "path", path, "error", err)
		}
	}
}

// drop forgets a blob: its torrents stop and its working file is removed.
func (s *Swarm) drop(b *blob) {
	s.mu.Lock()
	if s.blobs[b.plan.Digest.Hex] == b {
		delete(s.blobs, b.plan.Digest.Hex)
	}
	path := b.path
	b.path = ""
	s.mu.Unlock()
	b.t.Drop()
	b.file.Close()
	if path != "" {
		_ = os.Remove(path)
	}
}
