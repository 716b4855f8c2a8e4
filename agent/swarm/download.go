package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/metainfo"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
)

// Source returns a store.Source that gets blob d through the swarm: the content store calls it
// once per missing blob, and it yields the blob's bytes in order as they are verified.
func (s *Swarm) Source(registry, repo string, d v1.Hash) store.Source {
	return func(ctx context.Context) (io.ReadCloser, int64, error) {
		size, err := s.cfg.Upstream.HeadBlob(ctx, registry, repo, d)
		if err != nil {
			return nil, 0, err
		}
		b, err := s.blobFor(d, size, registry, repo)
		if err != nil {
			return nil, 0, err
		}
		b.downloadOnce.Do(func() {
			b.started = time.Now()
			go s.acquireAll(b)
		})
		return &blobReader{s: s, b: b, ctx: ctx}, size, nil
	}
}

// acquireAll gets the torrent of every segment, asking seeders at most UpstreamWindow segments
// ahead so that early segments are fetched from upstream first.
func (s *Swarm) acquireAll(b *blob) {
	window := make(chan struct{}, s.cfg.UpstreamWindow)
	for k := range b.segs {
		window <- struct{}{}
		go func() {
			defer func() { <-window }()
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.InfoTimeout+time.Minute)
			defer cancel()
			if err := s.acquire(ctx, b, k); err != nil {
				s.log.Warn("segment unavailable through the swarm; readers will fetch it directly", "digest", b.plan.digest, "segment", k, "error", err)
				b.segs[k].fail(err)
			}
		}()
	}
}

// acquire gets segment k's torrent: from its seeder, or by seeding it here when this node is the
// seeder or every seeder candidate failed.
func (s *Swarm) acquire(ctx context.Context, b *blob, k int) error {
	seg := b.segs[k]
	failed := map[netip.AddrPort]bool{}
	timeouts := 0
	for {
		if info, _, _, _ := seg.state(); info != nil {
			return nil
		}
		live := s.cfg.Membership.Live()
		seeder, _ := seederOf(b.plan, k, b.assignment, b.members, func(m netip.AddrPort) bool {
			return !failed[m] && slices.Contains(live, m)
		})
		if !seeder.IsValid() || seeder == s.self {
			_, err := s.ensureSegment(ctx, b, k)
			return err
		}
		answer, err := s.requestSegment(ctx, seeder, b, k)
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			s.metrics.seederFailures.Inc()
			switch {
			case isSeederError(err):
			case !isTimeout(err):
				s.cfg.Membership.ReportFailure(seeder)
			case timeouts < seederTimeoutsToFail && slices.Contains(s.cfg.Membership.Live(), seeder):
				timeouts++
				// A timeout: a congested link drops SYNs (the retry comes a second later) and a busy
				// node answers late. Moving on would fetch the segment from upstream a second time, so
				// ask again a few times, unless the probes have found it dead meanwhile.
				s.log.Debug("seeder slow to answer, asking again", "digest", b.plan.digest, "segment", k, "seeder", seeder, "error", err)
				select {
				case <-time.After(seederRetryPause):
				case <-ctx.Done():
					return ctx.Err()
				}
				continue
			}
			failed[seeder], timeouts = true, 0
			s.log.Info("seeder failed, trying the next one", "digest", b.plan.digest, "segment", k, "seeder", seeder, "error", err)
			continue
		}
		t, err := s.addTorrent(b, k, answer.Info, b.state)
		if err != nil {
			return err
		}
		seg.publish(answer.Info, t)
		s.addPeers(t, answer.Peers)
		go s.announce(b, k, seeder)
		return nil
	}
}

// announce asks the seeder for fresh peers until the segment is complete here, as a tracker
// announce would; a seeder that disappears just stops being asked.
func (s *Swarm) announce(b *blob, k int, seeder netip.AddrPort) {
	_, t, _, _ := b.segs[k].state()
	ticker := time.NewTicker(announceInterval)
	defer ticker.Stop()
	for {
		select {
		case <-t.Complete().On():
			return
		case <-t.Closed():
			return
		case <-ticker.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		answer, err := s.requestSegment(ctx, seeder, b, k)
		cancel()
		if err != nil {
			return
		}
		s.addPeers(t, answer.Peers)
	}
}

func (s *Swarm) addPeers(t *torrent.Torrent, peers []string) {
	infos := make([]torrent.PeerInfo, 0, len(peers))
	for _, p := range peers {
		ap, err := netip.ParseAddrPort(p)
		if err != nil || ap == s.self || !s.cfg.Membership.Allowed(ap.Addr()) {
			continue
		}
		// Not Trusted: a member that sends bad pieces must be banned like anyone else.
		infos = append(infos, torrent.PeerInfo{Addr: ap, Source: torrent.PeerSourceDirect})
	}
	t.AddPeers(infos)
}

// ensureSegment returns segment k's info, seeding it here if nobody has published it yet: from
// the local content store when the blob is complete there, else from upstream.
func (s *Swarm) ensureSegment(ctx context.Context, b *blob, k int) ([]byte, error) {
	seg := b.segs[k]
	for {
		info, _, ready, _ := seg.state()
		if info != nil {
			return info, nil
		}
		if seg.startSeeding() {
			go s.seed(b, k)
		}
		select {
		case <-ready:
			if info, _, _, err := seg.state(); info == nil && err != nil {
				return nil, err
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for segment %d of %s: %w", k, b.plan.digest, ctx.Err())
		}
	}
}

// seed fetches segment k's bytes, hashes its pieces, and publishes its torrent.
func (s *Swarm) seed(b *blob, k int) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.InfoTimeout+time.Minute)
	defer cancel()
	offset, length := b.plan.segment(k)
	start := time.Now()
	local := s.openLocal(b)
	if local != nil {
		defer local.Close()
	} else {
		release, err := s.seedSlot(ctx, k)
		if err != nil {
			b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.digest, err))
			return
		}
		defer release()
	}
	pieces, source, err := s.fetchSegment(ctx, b, local, offset, length)
	if err != nil {
		b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.digest, err))
		return
	}
	s.metrics.bytes.WithLabelValues(source).Add(float64(length))
	info, err := buildInfo(b.plan, k, pieces)
	if err == nil {
		var t *torrent.Torrent
		if t, err = s.addTorrent(b, k, info, allComplete); err == nil {
			b.segs[k].publish(info, t)
			s.log.Info("seeding segment", "digest", b.plan.digest, "segment", k, "from", source,
				"bytes", length, "duration", time.Since(start))
			return
		}
	}
	b.segs[k].fail(fmt.Errorf("seed segment %d of %s: %w", k, b.plan.digest, err))
}

// fetchSegment copies a segment into the blob's file and returns its piece hashes: from local,
// the complete blob in the content store, when there is one, else from upstream, as several
// ranges at once: more TCP flows take a larger share of a downlink that peers are also using,
// and each flow's round trips overlap.
func (s *Swarm) fetchSegment(ctx context.Context, b *blob, local store.Blob, offset, length int64) ([]byte, string, error) {
	if local != nil {
		pieces, err := copyAndHash(ctx, io.NewSectionReader(local, offset, length), b.file, offset, length, b.plan.pieceLength)
		return pieces, sourceLocal, err
	}
	pieceLength := b.plan.pieceLength
	nPieces := (length + pieceLength - 1) / pieceLength
	streams := min(int64(upstreamStreams), nPieces)
	perStream := (nPieces + streams - 1) / streams * pieceLength
	pieces := make([]byte, nPieces*sha1Size)
	errs := make(chan error, streams)
	for i := range streams {
		start := i * perStream
		if start >= length {
			errs <- nil
			continue
		}
		n := min(perStream, length-start)
		go func() {
			rc, _, err := s.cfg.Upstream.Blob(ctx, b.registry, b.repo, b.plan.digest, offset+start, n)
			if err != nil {
				errs <- err
				return
			}
			defer rc.Close()
			hashes, err := copyAndHash(ctx, rc, b.file, offset+start, n, pieceLength)
			if err == nil {
				copy(pieces[start/pieceLength*sha1Size:], hashes)
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

// openLocal opens blob b in the content store if it is complete there, else returns nil.
func (s *Swarm) openLocal(b *blob) store.Blob {
	if s.cfg.Local == nil {
		return nil
	}
	local, err := s.cfg.Local.Get(b.plan.digest)
	if err != nil {
		return nil
	}
	return local
}

// addTorrent adds segment k's torrent, stored in the blob's file at the segment's offset.
func (s *Swarm) addTorrent(b *blob, k int, info []byte, state completionState) (*torrent.Torrent, error) {
	if err := checkInfo(b.plan, k, info); err != nil {
		return nil, fmt.Errorf("segment %d of %s: %w", k, b.plan.digest, err)
	}
	offset, _ := b.plan.segment(k)
	t, isNew := s.client.AddTorrentOpt(torrent.AddTorrentOpts{
		InfoHash:  metainfo.HashBytes(info),
		InfoBytes: info,
		Storage:   newSegmentStorage(b.file, offset, b.plan.pieces(k), state),
		ChunkSize: chunkSize,
	})
	if isNew {
		t.SetOnWriteChunkError(func(err error) {
			s.log.Error("cannot write segment data; dropping the segment", "digest", b.plan.digest, "segment", k, "error", err)
			t.Drop()
		})
		t.DownloadAll()
	}
	return t, nil
}

// readaheadPieces is how many pieces ahead of the reader are fetched with priority.
const readaheadPieces = 2

// blobReader reads a blob in order, segment after segment, from the segments' torrents; a
// segment the swarm cannot deliver (no torrent, or no progress for StallTimeout) is read from
// upstream directly. Either way the content store verifies the whole blob's digest.
type blobReader struct {
	s   *Swarm
	b   *blob
	ctx context.Context

	pos    int64 // bytes of the blob already returned
	k      int
	reader torrent.Reader // of segment k, when reading from the swarm
	segPos int64          // position in segment k
	direct io.ReadCloser  // of the rest of segment k, when reading from upstream
}

func (r *blobReader) Read(p []byte) (int, error) {
	if r.pos >= r.b.plan.size {
		r.s.finished(r.b)
		return 0, io.EOF
	}
	_, length := r.b.plan.segment(r.k)
	if r.segPos >= length {
		r.closeSegment()
		r.k++
		r.segPos = 0
		return r.Read(p)
	}
	p = p[:min(int64(len(p)), length-r.segPos)]
	if r.direct != nil {
		return r.readDirect(p)
	}
	if r.reader == nil {
		if err := r.openSegment(); err != nil {
			return 0, err
		}
		if r.direct != nil {
			return r.readDirect(p)
		}
	}
	_, t, _, _ := r.b.segs[r.k].state()
	var n int
	var err error
	blocked := time.Now()
	for {
		// Pieces arrive rarest-first, so the one the reader waits for may come late while the
		// segment is progressing: a segment is stalled when it completes nothing for
		// StallTimeout, or when the reader has waited twice that long in all (the content store
		// gives up on a download that delivers nothing for longer).
		before := t.BytesCompleted()
		ctx, cancel := context.WithTimeout(r.ctx, r.s.cfg.StallTimeout)
		n, err = r.reader.ReadContext(ctx, p)
		cancel()
		if n > 0 || err == nil || r.ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) ||
			t.BytesCompleted() == before || time.Since(blocked) >= 2*r.s.cfg.StallTimeout {
			break
		}
	}
	r.advance(n)
	if err != nil && r.ctx.Err() == nil && !errors.Is(err, io.EOF) {
		// The swarm made no progress: read the rest of this segment from upstream.
		stats := t.Stats()
		r.s.log.Warn("segment stalled in the swarm; reading the rest from upstream",
			"digest", r.b.plan.digest, "segment", r.k, "at", r.segPos, "error", err,
			"peers_known", stats.TotalPeers, "peers_active", stats.ActivePeers, "seeders", stats.ConnectedSeeders,
			"half_open", stats.HalfOpenPeers, "pieces_complete", stats.PiecesComplete, "peer_conns", len(t.PeerConns()))
		r.s.metrics.stalls.Inc()
		if derr := r.openDirect(); derr != nil {
			return n, derr
		}
		return n, nil
	}
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

func (r *blobReader) advance(n int) {
	r.pos += int64(n)
	r.segPos += int64(n)
}

// openSegment waits for segment k's torrent and opens a reader on it.
func (r *blobReader) openSegment() error {
	seg := r.b.segs[r.k]
	ctx, cancel := context.WithTimeout(r.ctx, r.s.cfg.InfoTimeout)
	defer cancel()
	for {
		info, t, ready, err := seg.state()
		if info != nil {
			// Never SetResponsive: a responsive reader returns chunks before their piece is
			// verified, and only verified bytes may leave the swarm.
			reader := t.NewReader()
			reader.SetContext(r.ctx)
			// A short readahead: the pieces just ahead of the reader come first, the rest of every
			// segment is fetched rarest-first, which keeps peers holding different pieces to trade.
			_, length := r.b.plan.segment(r.k)
			reader.SetReadahead(min(length, readaheadPieces*r.b.plan.pieceLength))
			if _, err := reader.Seek(r.segPos, io.SeekStart); err != nil {
				_ = reader.Close()
				return fmt.Errorf("seek segment %d: %w", r.k, err)
			}
			r.reader = reader
			return nil
		}
		if err != nil {
			return r.openDirect()
		}
		select {
		case <-ready:
		case <-ctx.Done():
			if r.ctx.Err() != nil {
				return r.ctx.Err()
			}
			return r.openDirect()
		}
	}
}

// openDirect reads the rest of segment k straight from upstream.
func (r *blobReader) openDirect() error {
	r.closeSegment()
	offset, length := r.b.plan.segment(r.k)
	rc, _, err := r.s.cfg.Upstream.Blob(r.ctx, r.b.registry, r.b.repo, r.b.plan.digest, offset+r.segPos, length-r.segPos)
	if err != nil {
		return fmt.Errorf("read segment %d of %s from upstream: %w", r.k, r.b.plan.digest, err)
	}
	r.direct = rc
	return nil
}

func (r *blobReader) readDirect(p []byte) (int, error) {
	n, err := r.direct.Read(p)
	r.advance(n)
	r.s.metrics.bytes.WithLabelValues(sourceUpstream).Add(float64(n))
	if errors.Is(err, io.EOF) {
		_, length := r.b.plan.segment(r.k)
		if r.segPos < length {
			return n, fmt.Errorf("segment %d of %s: upstream ended early: %w", r.k, r.b.plan.digest, io.ErrUnexpectedEOF)
		}
		err = nil
	}
	return n, err
}

func (r *blobReader) closeSegment() {
	if r.reader != nil {
		_ = r.reader.Close()
		r.reader = nil
	}
	if r.direct != nil {
		_ = r.direct.Close()
		r.direct = nil
	}
}

// Close implements io.Closer; the torrents keep seeding for the other nodes.
func (r *blobReader) Close() error {
	r.closeSegment()
	return nil
}

// finished records a blob read to its end and hands its data over to the content store.
func (s *Swarm) finished(b *blob) {
	b.finishOnce.Do(func() {
		if !b.started.IsZero() {
			s.metrics.completion.Observe(time.Since(b.started).Seconds())
		}
		var read, wasted, written int64
		for _, seg := range b.segs {
			if _, t, _, _ := seg.state(); t != nil {
				st := t.Stats()
				read += st.BytesReadUsefulData.Int64()
				wasted += st.ChunksReadWasted.Int64()
				written += st.BytesWrittenData.Int64()
			}
		}
		s.log.Info("blob delivered", "digest", b.plan.digest, "duration", time.Since(b.started),
			"peer_bytes", read, "wasted_chunks", wasted, "uploaded_bytes", written)
		go s.handover(b)
	})
}

// handover waits for the content store to commit a blob the swarm delivered, then serves its
// segment torrents from the store's file and deletes the working file, so a blob is kept on
// disk once. If the store does not take the blob (its digest did not match, or the store is
// full), the blob's swarm state is dropped altogether.
func (s *Swarm) handover(b *blob) {
	if s.cfg.Local == nil {
		return
	}
	deadline := time.Now().Add(handoverTimeout)
	for {
		local, err := s.cfg.Local.Get(b.plan.digest)
		if err == nil {
			b.file.swap(local, nil, local)
			s.mu.Lock()
			path := b.path
			b.path = ""
			s.mu.Unlock()
			if path != "" {
				if err := os.Remove(path); err != nil {
					s.log.Warn("cannot remove a swarm working file", "path", path, "error", err)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			s.log.Warn("the content store did not keep a blob the swarm delivered; dropping it from the swarm", "digest", b.plan.digest)
			s.drop(b)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// handoverTimeout bounds waiting for the content store to commit a delivered blob.
const handoverTimeout = 30 * time.Second

// drop forgets a blob: its torrents stop and its working file is removed.
func (s *Swarm) drop(b *blob) {
	s.mu.Lock()
	if s.blobs[b.plan.digest.Hex] == b {
		delete(s.blobs, b.plan.digest.Hex)
	}
	path := b.path
	b.path = ""
	s.mu.Unlock()
	for _, seg := range b.segs {
		if _, t, _, _ := seg.state(); t != nil {
			t.Drop()
		}
	}
	b.file.close()
	if path != "" {
		_ = os.Remove(path)
	}
}
