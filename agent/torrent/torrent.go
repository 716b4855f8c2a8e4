package torrent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/metainfo"
	pp "github.com/anacrolix/torrent/peer_protocol"
)

// Priority is how urgently a piece is wanted.
type Priority int

// Piece priorities, lowest first.
const (
	PriorityNone   Priority = iota // not wanted (its bytes come from elsewhere)
	PriorityNormal                 // wanted, rarest first
	PriorityHigh                   // wanted before the normal ones
)

func (p Priority) client() torrent.PiecePriority {
	switch p {
	case PriorityNormal:
		return torrent.PiecePriorityNormal
	case PriorityHigh:
		return torrent.PiecePriorityHigh
	}
	return torrent.PiecePriorityNone
}

// Torrent is one blob's torrent: its pieces are stored in a File, and their hashes arrive by
// ranges (SetHashes) as the blob's segments are published.
type Torrent struct {
	c  *Client
	t  *torrent.Torrent
	st *blobStorage

	prioMu  sync.Mutex
	prio    []Priority // every piece's priority, as set by SetPriority (see refreshPriorities)
	horizon int        // pieces from here on are not requested, whatever their priority (SetHorizon)
}

// AddBlob adds the torrent of a blob named name (its digest's hex) of length bytes in pieces of
// pieceLength, stored in file. It trades no piece until SetHashes gives that piece's hash.
// onWriteError is called when a chunk from a peer cannot be written (a full disk, say); the
// torrent is dropped then.
func (c *Client) AddBlob(name string, length, pieceLength int64, file *File, onWriteError func(error)) (*Torrent, error) {
	info, err := BlobInfo(name, length, pieceLength)
	if err != nil {
		return nil, err
	}
	n := int((length + pieceLength - 1) / pieceLength)
	st := newBlobStorage(file, n)
	st.onLiar = c.ban
	st.onBadPiece = func() { c.piecesBad.Add(1) }
	st.onReadBack = func() { c.readBacks.Add(1) }
	t, isNew := c.c.AddTorrentOpt(torrent.AddTorrentOpts{
		InfoHash:  metainfo.HashBytes(info),
		InfoBytes: info,
		Storage:   st,
		ChunkSize: pp.Integer(c.cfg.ChunkSize),
		// Nothing to check before hashes arrive; a resumed download is verified range by range
		// as they do.
		DisableInitialPieceCheck: true,
	})
	if !isNew {
		return nil, errors.New("its torrent is already open")
	}
	b := &Torrent{c: c, t: t, st: st, prio: make([]Priority, n), horizon: n}
	c.torrents.Store(t, b)
	// Added while the client is paused: it downloads nothing until Resume.
	c.pauseMu.Lock()
	if c.paused {
		t.DisallowDataDownload()
	}
	c.pauseMu.Unlock()
	t.SetOnWriteChunkError(func(err error) {
		if errors.Is(err, ErrFrozen) {
			return // a late chunk of a piece read from elsewhere instead
		}
		if onWriteError != nil {
			onWriteError(err)
		}
		t.Drop()
	})
	return b, nil
}

// CompletionState is how SetHashes records the pieces whose hashes it gives.
type CompletionState int

// Completion states of pieces whose hashes arrive.
const (
	AllIncomplete     CompletionState = iota // a fresh download
	AllComplete                              // written and hashed by this node
	UnknownCompletion                        // resumed: verified against the hashes in the background
)

// SetHashes records the hashes of the pieces from first on (a segment's "pieces", HashSize
// bytes each) and their state; the torrent trades those pieces from then on. A piece already
// complete stays complete.
func (t *Torrent) SetHashes(first int, pieces []byte, state CompletionState) {
	n := len(pieces) / sha1Size
	t.st.setHashes(first, pieces, state)
	for i := first; i < first+n; i++ {
		t.t.Piece(i).UpdateCompletion()
	}
	if state == UnknownCompletion {
		// Verification ends when the torrent closes; Client.Close waits for it.
		t.c.goBackground(func() {
			for i := first; i < first+n; i++ {
				if err := t.t.Piece(i).VerifyDataContext(context.Background()); err != nil {
					return
				}
			}
		})
	}
}

// CompleteIfHash marks piece i complete if its known hash is hash (its bytes, now in the file,
// were hashed by the caller), and reports whether it did.
func (t *Torrent) CompleteIfHash(i int, hash []byte) bool {
	if !t.st.completeIfHash(i, hash) {
		return false
	}
	t.t.Piece(i).UpdateCompletion()
	return true
}

// MarkVerified records every piece as complete (the whole blob was verified by other means),
// pieces without hashes included: the torrent then seeds all of it and completes.
func (t *Torrent) MarkVerified() {
	t.st.markVerified()
	for i := range t.st.known {
		t.t.Piece(i).UpdateCompletion()
	}
}

// Freeze stops the torrent from writing or requesting pieces [from, to) for good, when their
// bytes come from elsewhere: no chunk still in flight lands on them. It returns once no write is
// in progress.
func (t *Torrent) Freeze(from, to int) {
	t.st.freezePieces(from, to)
	t.SetPriority(from, to, PriorityNone)
}

// Lose tells the torrent that piece i is no longer here (its bytes were lost or damaged): it
// stops offering it, and fetches it again if it is wanted.
func (t *Torrent) Lose(i int) {
	t.st.setComplete(i, false)
	t.t.Piece(i).UpdateCompletion()
}

// IsFrozen reports whether piece i was frozen.
func (t *Torrent) IsFrozen(i int) bool { return t.st.isFinal(i) }

// SetPriority sets the priority of pieces [from, to) and records it (see refreshPriorities).
func (t *Torrent) SetPriority(from, to int, prio Priority) {
	t.prioMu.Lock()
	defer t.prioMu.Unlock()
	for i := from; i < to; i++ {
		t.prio[i] = prio
		t.applyPriorityLocked(i)
	}
}

// RaisePriority gives the pieces of [from, to) that have the normal priority priority prio.
func (t *Torrent) RaisePriority(from, to int, prio Priority) {
	t.prioMu.Lock()
	defer t.prioMu.Unlock()
	for i := from; i < to; i++ {
		if t.prio[i] == PriorityNormal {
			t.prio[i] = prio
			t.applyPriorityLocked(i)
		}
	}
}

// SetHorizon stops requests for the pieces from h on, whatever their priority, until a later
// call moves the horizon past them; h at or past the last piece lifts it. The pieces keep their
// priorities, which apply again once they are inside the horizon.
func (t *Torrent) SetHorizon(h int) {
	t.prioMu.Lock()
	defer t.prioMu.Unlock()
	h = min(max(h, 0), len(t.prio))
	from, to := min(h, t.horizon), max(h, t.horizon)
	t.horizon = h
	for i := from; i < to; i++ {
		t.applyPriorityLocked(i)
	}
}

// applyPriorityLocked gives piece i's priority to the client: none beyond the horizon.
func (t *Torrent) applyPriorityLocked(i int) {
	prio := t.prio[i]
	if i >= t.horizon {
		prio = PriorityNone
	}
	t.t.Piece(i).SetPriority(prio.client())
}

// refreshPriorities sets every piece's priority again, to what it is (see Client.Pause).
func (t *Torrent) refreshPriorities() {
	t.prioMu.Lock()
	defer t.prioMu.Unlock()
	for i := range t.prio {
		t.applyPriorityLocked(i)
	}
}

// PieceComplete reports whether piece i is verified here.
func (t *Torrent) PieceComplete(i int) bool { return t.t.Piece(i).State().Complete }

// PiecePartial reports whether some chunks of piece i have come.
func (t *Torrent) PiecePartial(i int) bool { return t.t.Piece(i).State().Partial }

// Holders counts the connected peers that have piece i, leaving out those skip says to.
func (t *Torrent) Holders(i int, skip func(netip.Addr) bool) int {
	n := 0
	for _, pc := range t.t.PeerConns() {
		if !pc.PeerPieces().Contains(uint32(i)) {
			continue
		}
		if ip, ok := peerIP(pc.RemoteAddr); ok && skip != nil && skip(ip) {
			continue
		}
		n++
	}
	return n
}

// PieceReport describes piece i for a log: what the client knows of it, and how many connected
// peers (those skip leaves in) have it.
func (t *Torrent) PieceReport(i int, skip func(netip.Addr) bool) slog.Attr {
	st := t.t.Piece(i).State()
	return slog.Group("piece", "index", i, "known", st.Ok, "complete", st.Complete, "partial", st.Partial,
		"checking", st.Checking, "priority", int(st.Priority), "peers_with_it", t.Holders(i, skip))
}

// Kick makes the client look again at whom to ask for piece i. The client reconsiders a
// connection's requests only on events (a chunk arriving on it, a "have", a piece changing
// state, ...), and a reader alone in a blob's torrent sometimes waits for a piece that a
// connected peer has while no connection has asked for it and none has an event to come (the
// lone-reader test reproduced it in about one run of ten). A piece whose completion goes from
// unknown to incomplete is such an event, on every connection whose peer has the piece: Kick
// makes the piece's completion unknown and then incomplete again. It reports whether it did (not
// for a piece that is complete or whose completion is unknown).
func (t *Torrent) Kick(i int) bool {
	if !t.st.forgetIncomplete(i) {
		return false
	}
	p := t.t.Piece(i)
	p.UpdateCompletion()
	t.st.restoreIncomplete(i)
	p.UpdateCompletion()
	return true
}

// AddPeers gives the torrent peers to connect to. They are not trusted: a member that sends bad
// pieces must be banned like anyone else.
func (t *Torrent) AddPeers(peers []netip.AddrPort) {
	infos := make([]torrent.PeerInfo, 0, len(peers))
	for _, ap := range peers {
		infos = append(infos, torrent.PeerInfo{Addr: ap, Source: torrent.PeerSourceDirect})
	}
	t.t.AddPeers(infos)
}

// TorrentStats are a torrent's counters.
type TorrentStats struct {
	PeerBytesRead, ChunksWasted, BytesWritten  int64 // useful bytes from peers, chunks received twice, bytes sent
	BytesReadData                              int64 // all piece data received
	PiecesComplete                             int
	PeersKnown, PeersActive, Seeders, HalfOpen int
	PeerConns                                  int
}

// Stats returns the torrent's counters.
func (t *Torrent) Stats() TorrentStats {
	st := t.t.Stats()
	return TorrentStats{
		PeerBytesRead: st.BytesReadUsefulData.Int64(), ChunksWasted: st.ChunksReadWasted.Int64(),
		BytesWritten: st.BytesWrittenData.Int64(), BytesReadData: st.BytesReadData.Int64(),
		PiecesComplete: st.PiecesComplete, PeersKnown: st.TotalPeers, PeersActive: st.ActivePeers,
		Seeders: st.ConnectedSeeders, HalfOpen: st.HalfOpenPeers, PeerConns: len(t.t.PeerConns()),
	}
}

// BytesCompleted is how many bytes of the blob are verified here.
func (t *Torrent) BytesCompleted() int64 { return t.t.BytesCompleted() }

// Complete is closed once every piece is complete.
func (t *Torrent) Complete() <-chan struct{} { return t.t.Complete().On() }

// Closed is closed once the torrent is dropped or the client closed.
func (t *Torrent) Closed() <-chan struct{} { return t.t.Closed() }

// Drop stops the torrent.
func (t *Torrent) Drop() {
	t.c.torrents.Delete(t.t)
	t.t.Drop()
}

// Reader reads verified pieces of a torrent in order: a read waits for the piece at its
// position to be verified. It never returns unverified chunks (it is never "responsive").
type Reader struct{ r torrent.Reader }

// NewReader returns a reader of the torrent whose reads end with ctx, and which has the
// readahead bytes after its position fetched with priority.
func (t *Torrent) NewReader(ctx context.Context, readahead int64) *Reader {
	r := t.t.NewReader()
	r.SetContext(ctx)
	r.SetReadahead(readahead)
	return &Reader{r: r}
}

// ReadContext reads at the reader's position, waiting until ctx ends for verified bytes.
func (r *Reader) ReadContext(ctx context.Context, p []byte) (int, error) {
	return r.r.ReadContext(ctx, p)
}

// Seek sets the reader's position.
func (r *Reader) Seek(offset int64, whence int) (int64, error) { return r.r.Seek(offset, whence) }

// Close releases the reader (its readahead stops asking for pieces).
func (r *Reader) Close() error { return r.r.Close() }

var _ io.Seeker = (*Reader)(nil)
