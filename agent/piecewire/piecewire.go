// Package piecewire moves the verified pieces of blobs between agents over HTTP: the lean bulk
// path of the swarm, measured against the BitTorrent client's (agent/torrent).
//
// A peer serves a piece only once it has verified it, straight from the blob's file with
// sendfile (no copy through the agent's memory). A node fetches each piece whole from one peer,
// writing it into its own file and hashing it (SHA-1, the segment infos' piece hashes) as the
// bytes arrive, so a piece is written once and read by nobody before it is verified. Which peer
// has which piece travels on a stream per peer and blob (the "haves"): the peer's bitfield,
// then each piece it verifies, as it does. Because a piece comes from a single peer, a piece
// that fails its hash names its sender without the per-block bookkeeping a torrent needs.
//
// What is fetched first is the node's choice, per piece, as in a torrent: pieces with a higher
// priority first (in order of the blob: what a reader waits for), then the rarest among the
// connected peers. Each peer has a few fetches in flight at most, and a fetch that moves no
// byte for the stall timeout is abandoned, so a slow or stopped peer holds no piece for long.
//
// Endpoints, on the agents' control port (members only, like the rest of it):
//
//	GET /swarm/v3/piece?blob=<sha256 hex>&index=<i>   the piece's bytes, 404 unless verified here
//	GET /swarm/v3/haves?blob=<sha256 hex>             the haves stream (see haves.go)
package piecewire

import (
	"context"
	"crypto/sha1" //nolint:gosec // the segment infos' piece hashes are SHA-1; blobs are verified by sha256 too
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/shoal-dev/shoal/internal/sockwater"
)

// HashSize is the length of a piece hash (SHA-1).
const HashSize = sha1.Size

// Paths of the endpoints.
const (
	PiecePath = "/swarm/v3/piece"
	HavesPath = "/swarm/v3/haves"
)

// Priority is how urgently a piece is wanted.
type Priority int

// Piece priorities, lowest first.
const (
	PriorityNone   Priority = iota // not wanted (its bytes come from elsewhere)
	PriorityNormal                 // wanted, rarest first
	PriorityHigh                   // wanted before the normal ones, in the blob's order
)

// CompletionState is how SetHashes records the pieces whose hashes it gives.
type CompletionState int

// Completion states of pieces whose hashes arrive.
const (
	AllIncomplete     CompletionState = iota // a fresh download
	AllComplete                              // written and hashed by this node
	UnknownCompletion                        // resumed: verified against the hashes in the background
)

// Errors a fetch of a piece ends with.
var (
	ErrBadPiece = errors.New("piece does not match its hash")
	errStalled  = errors.New("piece fetch stalled")
	// errPieceDone ends a fetch of a piece that another fetch, or another path, completed.
	errPieceDone = errors.New("piece completed elsewhere")
	errClosed    = errors.New("blob closed")
	errBusy      = errors.New("peer serves as many pieces as it may")
)

// Config configures a Node.
type Config struct {
	// Client makes the requests to peers (from the node's own address).
	Client *http.Client
	// FetchesPerPeer bounds the pieces fetched from one peer at once (default 2).
	FetchesPerPeer int
	// MaxFetches bounds the pieces this node fetches at once, all blobs and peers together
	// (default 8); MaxUploads the pieces it serves at once (default 8): a peer asking for more
	// is told to come back (503) and asks another. More in flight than the link carries in a
	// second only queues: the piece a reader waits for sits behind the others, and a fetch
	// shares the link with so many that it moves no byte for the stall timeout.
	MaxFetches, MaxUploads int
	// MaxDuplicates bounds the endgame's second fetches of a piece in flight, node-wide
	// (default 4); each holds its piece in memory until it is verified.
	MaxDuplicates int
	// StallTimeout abandons a fetch that has moved no byte for this long (default 2 s).
	StallTimeout time.Duration
	// MaxUploadRate caps the bytes per second served to peers, MaxDownloadRate those read from
	// peers (all blobs together); 0 = unlimited.
	MaxUploadRate, MaxDownloadRate int64
	// Refused reports whether a peer IP is banned or not a member: it is neither served nor
	// fetched from. Nil refuses nobody.
	Refused func(netip.Addr) bool
	// OnBadPiece is told of a peer that sent a piece failing its hash (the swarm bans it).
	OnBadPiece func(netip.Addr)
	// OnData is told of every peer that sent a verified piece (it is alive).
	OnData func(netip.Addr)
	Logger *slog.Logger
}

// Node serves the verified pieces of its blobs to peers and fetches theirs.
type Node struct {
	cfg         Config
	limiter     *rate.Limiter // uploads; nil = unlimited
	downLimiter *rate.Limiter // fetches; nil = unlimited

	mu    sync.Mutex
	blobs map[string]*Blob

	pauseMu  sync.Mutex
	isPaused bool

	fetchSlots, uploadSlots chan struct{} // see Config.MaxFetches
	dupSlots                chan struct{} // see Config.MaxDuplicates
	// fetchTime is a moving average of how long a piece fetch took here (nanoseconds): the
	// endgame fetches a piece a second time once its fetch has run longer than that.
	fetchTime atomic.Int64

	bytesIn, bytesOut, piecesBad, busy atomic.Int64
	piecesGood, dups, dupsWon          atomic.Int64
}

var errPaused = errors.New("peer downloads paused")

// Pause starts no fetch from peers until Resume (serving peers goes on): a node fetching a
// segment from upstream keeps its downlink for that. Fetches under way finish: each is one
// piece, and cancelling them threw away the part of the piece that had come, closed the
// connection and fetched the piece again (8 nodes, 256 MiB, cold: 17-19 agent CPU-s per GiB
// delivered with the cancels, 12.7 without).
func (n *Node) Pause() {
	n.pauseMu.Lock()
	defer n.pauseMu.Unlock()
	n.isPaused = true
}

// Resume lets fetches from peers start again after Pause.
func (n *Node) Resume() {
	n.pauseMu.Lock()
	n.isPaused = false
	n.pauseMu.Unlock()
	for _, b := range n.blobList() {
		b.mu.Lock()
		b.wakeAllLocked()
		b.mu.Unlock()
	}
}

func (n *Node) paused() bool {
	n.pauseMu.Lock()
	defer n.pauseMu.Unlock()
	return n.isPaused
}

// CloseRefused stops following, serving haves to and fetching from every peer Config.Refused
// now refuses (a member that left, a banned peer); AddPeers may give it again later.
func (n *Node) CloseRefused() {
	if n.cfg.Refused == nil {
		return
	}
	for _, b := range n.blobList() {
		b.mu.Lock()
		for st := range b.streams {
			if n.cfg.Refused(st.peer) {
				st.cancel()
			}
		}
		for a, p := range b.peers {
			if n.cfg.Refused(a.Addr()) {
				p.cancel()
				for i, h := range p.has {
					if h {
						b.avail[i]--
					}
				}
				delete(b.peers, a)
			}
		}
		b.mu.Unlock()
	}
}

// Stats are a node's counters.
type Stats struct {
	BytesFromPeers, BytesToPeers, PiecesGood, PiecesBad int64
	UploadsRefused                                      int64 // piece requests answered "busy" (Config.MaxUploads)
	// Duplicates counts the endgame's second fetches of a piece, DuplicatesWon those that
	// completed their piece before the first fetch did.
	Duplicates, DuplicatesWon int64
}

// NewNode returns a node; serve its Handler on the control port.
func NewNode(cfg Config) *Node {
	if cfg.FetchesPerPeer <= 0 {
		cfg.FetchesPerPeer = 2
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Client == nil {
		cfg.Client = http.DefaultClient
	}
	if cfg.MaxFetches <= 0 {
		cfg.MaxFetches = 8
	}
	if cfg.MaxUploads <= 0 {
		cfg.MaxUploads = 8
	}
	if cfg.MaxDuplicates <= 0 {
		cfg.MaxDuplicates = 4
	}
	n := &Node{cfg: cfg, blobs: map[string]*Blob{}, fetchSlots: make(chan struct{}, cfg.MaxFetches),
		uploadSlots: make(chan struct{}, cfg.MaxUploads), dupSlots: make(chan struct{}, cfg.MaxDuplicates)}
	if cfg.MaxUploadRate > 0 {
		n.limiter = rate.NewLimiter(rate.Limit(cfg.MaxUploadRate), uploadSlice)
	}
	if cfg.MaxDownloadRate > 0 {
		n.downLimiter = rate.NewLimiter(rate.Limit(cfg.MaxDownloadRate), downloadSlice)
	}
	return n
}

// Stats returns the node's counters.
func (n *Node) Stats() Stats {
	return Stats{BytesFromPeers: n.bytesIn.Load(), BytesToPeers: n.bytesOut.Load(), PiecesGood: n.piecesGood.Load(),
		PiecesBad: n.piecesBad.Load(), UploadsRefused: n.busy.Load(), Duplicates: n.dups.Load(), DuplicatesWon: n.dupsWon.Load()}
}

// busyBackoff is how long (to twice that) a fetcher waits after a peer said it is busy.
const busyBackoff = 100 * time.Millisecond

// uploadSlice is what one sendfile call sends when uploads are rate-limited.
const uploadSlice = 256 << 10

// fetchBuffer is what a fetch reads from the socket before writing it to the file.
const fetchBuffer = 256 << 10

// downloadSlice is what one read of a fetch takes when downloads are rate-limited: the socket
// is read no faster than the cap, and TCP's flow control slows the sender.
const downloadSlice = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, fetchBuffer); return &b }}

// Blob is one blob's pieces on a node: stored in a file, their hashes arriving by ranges
// (SetHashes), fetched from the peers given (AddPeers) and served to any peer once verified.
type Blob struct {
	n           *Node
	name        string // the digest's hex
	size        int64
	pieceLength int64
	pieces      int

	ctx    context.Context
	cancel context.CancelFunc

	fileMu sync.RWMutex // writers hold it shared, Freeze and SetFile exclusively
	data   io.ReaderAt  // the blob's bytes; served with sendfile when it is a Reopener
	writer io.WriterAt  // nil once the blob is read-only (the content store's copy)

	mu           sync.Mutex
	changed      chan struct{} // closed and replaced when a piece completes or is lost, or the blob is dropped
	grew         chan struct{} // closed and replaced whenever log grows
	hashes       [][HashSize]byte
	known        []bool
	complete     []bool
	frozen       []bool
	prio         []Priority
	horizon      int // pieces from here on are not fetched, whatever their priority (SetHorizon)
	inflight     []int
	fetching     [][]*fetchState // the fetches of each piece under way
	claimed      []bool          // an endgame fetch writes the piece it verified (commitCopy)
	avail        []int           // connected peers that have each piece
	log          []uint32        // pieces in the order they became complete here, for the haves streams
	nComplete    int
	bytesDone    int64
	done         chan struct{} // closed when every piece is complete (for good: see Lose)
	doneClosed   bool
	peers        map[netip.AddrPort]*peer
	closed       bool
	workers      sync.WaitGroup
	readers      map[*Reader]struct{}
	onWriteError func(error)
	writeFailed  bool
	streams      map[*stream]struct{} // haves streams served

	bytesIn, bytesOut atomic.Int64
}

// BlobStats are a blob's counters.
type BlobStats struct {
	BytesFromPeers, BytesToPeers int64 // verified piece bytes received; piece bytes sent
	PiecesComplete               int
	Peers, PeersFollowed         int // peers given; those whose haves stream is up
	Streams                      int // haves streams served to peers
}

// Stats returns the blob's counters.
func (b *Blob) Stats() BlobStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := BlobStats{BytesFromPeers: b.bytesIn.Load(), BytesToPeers: b.bytesOut.Load(), PiecesComplete: b.nComplete,
		Peers: len(b.peers), Streams: len(b.streams)}
	for _, p := range b.peers {
		if p.following {
			st.PeersFollowed++
		}
	}
	return st
}

type peer struct {
	addr   netip.AddrPort
	ctx    context.Context // ends when the blob is dropped or the peer is refused (CloseRefused)
	cancel context.CancelFunc
	wake   chan struct{} // see wakeLocked
	// Under Blob.mu:
	has       []bool
	following bool // its haves stream is up
}

// AddBlob adds the blob name (its digest's hex) of size bytes in pieces of pieceLength, read from
// data and written through writer at the blob's offsets (the Blob closes neither). It fetches no
// piece before SetHashes gives that piece's hash.
func (n *Node) AddBlob(name string, size, pieceLength int64, data io.ReaderAt, writer io.WriterAt) (*Blob, error) {
	if size <= 0 || pieceLength <= 0 {
		return nil, fmt.Errorf("blob %s: size %d, piece length %d: both must be positive", name, size, pieceLength)
	}
	pieces := int((size + pieceLength - 1) / pieceLength)
	ctx, cancel := context.WithCancel(context.Background())
	b := &Blob{
		n: n, name: name, size: size, pieceLength: pieceLength, pieces: pieces,
		ctx: ctx, cancel: cancel, data: data, writer: writer,
		changed:  make(chan struct{}),
		grew:     make(chan struct{}),
		hashes:   make([][HashSize]byte, pieces),
		known:    make([]bool, pieces),
		complete: make([]bool, pieces),
		frozen:   make([]bool, pieces),
		prio:     make([]Priority, pieces),
		horizon:  pieces,
		inflight: make([]int, pieces),
		fetching: make([][]*fetchState, pieces),
		claimed:  make([]bool, pieces),
		avail:    make([]int, pieces),
		done:     make(chan struct{}),
		peers:    map[netip.AddrPort]*peer{},
		readers:  map[*Reader]struct{}{},
		streams:  map[*stream]struct{}{},
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.blobs[name]; ok {
		cancel()
		return nil, fmt.Errorf("blob %s is already added", name)
	}
	n.blobs[name] = b
	return b, nil
}

func (n *Node) blob(name string) *Blob {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.blobs[name]
}

// blobList returns the node's blobs.
func (n *Node) blobList() []*Blob {
	n.mu.Lock()
	defer n.mu.Unlock()
	blobs := make([]*Blob, 0, len(n.blobs))
	for _, b := range n.blobs {
		blobs = append(blobs, b)
	}
	return blobs
}

// Close drops every blob.
func (n *Node) Close() {
	for _, b := range n.blobList() {
		b.Drop()
	}
}

// Drop stops every fetch of the blob and its haves streams, and forgets it. The file stays.
func (b *Blob) Drop() {
	b.n.mu.Lock()
	if b.n.blobs[b.name] == b {
		delete(b.n.blobs, b.name)
	}
	b.n.mu.Unlock()
	b.cancel() // fetches under way end before readers learn the blob is gone
	b.mu.Lock()
	b.closed = true
	b.notifyLocked()
	b.mu.Unlock()
	b.workers.Wait()
}

// notifyLocked wakes the readers waiting for pieces.
func (b *Blob) notifyLocked() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// wakeLocked tells p's idle fetchers to look for a piece again: p has a new one.
func (b *Blob) wakeLocked(p *peer) {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// wakeAllLocked tells every idle fetcher to look for a piece again: what is wanted changed.
func (b *Blob) wakeAllLocked() {
	for _, p := range b.peers {
		b.wakeLocked(p)
	}
}

func (b *Blob) length(i int) int64 {
	if i == b.pieces-1 {
		return b.size - int64(i)*b.pieceLength
	}
	return b.pieceLength
}

// Pieces is the number of pieces.
func (b *Blob) Pieces() int { return b.pieces }

// SetHashes records the hashes of the pieces from first on (HashSize bytes each) and their
// state. A piece already complete stays complete.
func (b *Blob) SetHashes(first int, hashes []byte, state CompletionState) error {
	n := len(hashes) / HashSize
	if len(hashes)%HashSize != 0 || first < 0 || first+n > b.pieces {
		return fmt.Errorf("blob %s: %d bytes of hashes from piece %d: out of its %d pieces", b.name, len(hashes), first, b.pieces)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var check []int
	for j := range n {
		i := first + j
		copy(b.hashes[i][:], hashes[j*HashSize:])
		b.known[i] = true
		switch {
		case b.complete[i]:
		case state == AllComplete:
			b.markCompleteLocked(i)
		case state == UnknownCompletion && !b.closed:
			b.inflight[i]++ // nobody fetches it while it is checked
			check = append(check, i)
		}
	}
	if len(check) > 0 {
		b.workers.Go(func() { b.checkPieces(check) })
	}
	b.notifyLocked()
	b.wakeAllLocked()
	return nil
}

func (b *Blob) markCompleteLocked(i int) {
	if b.complete[i] {
		return
	}
	b.complete[i] = true
	for _, f := range b.fetching[i] {
		f.cancel(errPieceDone)
	}
	b.nComplete++
	b.bytesDone += b.length(i)
	b.log = append(b.log, uint32(i))
	close(b.grew)
	b.grew = make(chan struct{})
	if b.nComplete == b.pieces && !b.doneClosed {
		b.doneClosed = true
		close(b.done)
	}
}

// CompleteIfHash marks piece i complete if hash is the hash SetHashes recorded for it (its
// bytes were written and hashed by another path, e.g. from upstream), and reports whether it is.
func (b *Blob) CompleteIfHash(i int, hash []byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i < 0 || i >= b.pieces || !b.known[i] || len(hash) != HashSize || [HashSize]byte(hash) != b.hashes[i] {
		return false
	}
	if !b.complete[i] {
		b.markCompleteLocked(i)
		b.notifyLocked()
	}
	return true
}

// MarkVerified marks every piece complete: the whole blob was verified by another path (its
// sha256, in the content store).
func (b *Blob) MarkVerified() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.pieces {
		b.markCompleteLocked(i)
	}
	b.notifyLocked()
}

// Lose marks piece i incomplete again (its bytes are no longer trusted): it is fetched again if
// wanted, and peers that ask for it are told it is not here.
func (b *Blob) Lose(i int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i < 0 || i >= b.pieces || !b.complete[i] {
		return
	}
	b.complete[i] = false
	b.nComplete--
	b.bytesDone -= b.length(i)
	b.notifyLocked()
	b.wakeAllLocked()
}

// SetFile replaces the blob's data and writer (by the content store's read-only copy of the
// complete blob, say: writer nil); writes under way finish first. The Blob closes neither.
func (b *Blob) SetFile(data io.ReaderAt, writer io.WriterAt) {
	b.fileMu.Lock()
	b.data, b.writer = data, writer
	b.fileMu.Unlock()
}

// checkPieces hashes pieces already in the blob's file (a resumed download) and marks those that
// match complete; the others are fetched.
func (b *Blob) checkPieces(pieces []int) {
	buf := make([]byte, b.pieceLength)
	for _, i := range pieces {
		ok := false
		if b.ctx.Err() == nil {
			b.fileMu.RLock()
			n, err := b.data.ReadAt(buf[:b.length(i)], int64(i)*b.pieceLength)
			b.fileMu.RUnlock()
			sum := sha1.Sum(buf[:n]) //nolint:gosec // see the import
			ok = err == nil && int64(n) == b.length(i) && sum == b.hashes[i]
		}
		b.mu.Lock()
		b.inflight[i]--
		if ok && !b.frozen[i] {
			b.markCompleteLocked(i)
			b.notifyLocked()
		}
		b.wakeAllLocked()
		b.mu.Unlock()
	}
}

// SetPriority sets the priority of pieces [from, to).
func (b *Blob) SetPriority(from, to int, prio Priority) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := max(from, 0); i < min(to, b.pieces); i++ {
		b.prio[i] = prio
	}
	b.wakeAllLocked()
}

// SetHorizon stops fetches of the pieces from h on, whatever their priority, until a later call
// moves the horizon past them; h at or past the last piece lifts it. Fetches under way finish.
func (b *Blob) SetHorizon(h int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h = min(max(h, 0), b.pieces)
	grew := h > b.horizon
	b.horizon = h
	if grew {
		b.wakeAllLocked()
	}
}

// wantedLocked reports whether piece i is to be fetched (or, when complete, was).
func (b *Blob) wantedLocked(i int) bool { return b.prio[i] != PriorityNone && i < b.horizon }

// Freeze stops the blob from writing or fetching pieces [from, to) for good (their bytes come
// from elsewhere): once it returns, no fetch writes into them.
func (b *Blob) Freeze(from, to int) {
	b.fileMu.Lock()
	b.mu.Lock()
	for i := max(from, 0); i < min(to, b.pieces); i++ {
		b.frozen[i] = true
		b.prio[i] = PriorityNone
	}
	b.mu.Unlock()
	b.fileMu.Unlock()
}

// IsFrozen reports whether piece i was frozen.
func (b *Blob) IsFrozen(i int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return i >= 0 && i < b.pieces && b.frozen[i]
}

// PiecePartial reports whether piece i is being fetched.
func (b *Blob) PiecePartial(i int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return i >= 0 && i < b.pieces && b.inflight[i] > 0
}

// RaisePriority gives the pieces of [from, to) that have the normal priority priority prio.
func (b *Blob) RaisePriority(from, to int, prio Priority) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := max(from, 0); i < min(to, b.pieces); i++ {
		if b.prio[i] == PriorityNormal {
			b.prio[i] = prio
		}
	}
	b.wakeAllLocked()
}

// PieceComplete reports whether piece i is verified here.
func (b *Blob) PieceComplete(i int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return i >= 0 && i < b.pieces && b.complete[i]
}

// BytesCompleted is how many bytes of the blob are verified here.
func (b *Blob) BytesCompleted() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.bytesDone
}

// Complete is closed once every piece is complete.
func (b *Blob) Complete() <-chan struct{} { return b.done }

// WaitPiece waits until piece i is verified here, or ctx ends, or the blob is dropped.
func (b *Blob) WaitPiece(ctx context.Context, i int) error {
	if i < 0 || i >= b.pieces {
		return fmt.Errorf("blob %s has no piece %d", b.name, i)
	}
	for {
		b.mu.Lock()
		complete, closed, ch := b.complete[i], b.closed, b.changed
		b.mu.Unlock()
		switch {
		case complete:
			return nil
		case closed:
			return errClosed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// AddPeers gives the blob peers to fetch from: it follows each one's haves and fetches what it
// wants from those that have it. They are not trusted: a piece that fails its hash is reported
// (Config.OnBadPiece) and fetched again from someone else.
func (b *Blob) AddPeers(addrs []netip.AddrPort) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	for _, a := range addrs {
		if _, ok := b.peers[a]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(b.ctx)
		p := &peer{addr: a, ctx: ctx, cancel: cancel, has: make([]bool, b.pieces), wake: make(chan struct{}, 1)}
		b.peers[a] = p
		b.workers.Go(func() { b.follow(p) })
		for range b.n.cfg.FetchesPerPeer {
			b.workers.Go(func() { b.fetchFrom(p) })
		}
	}
}

func (b *Blob) refused(a netip.AddrPort) bool {
	return b.n.cfg.Refused != nil && b.n.cfg.Refused(a.Addr())
}

// fetchFrom fetches, one after the other, the pieces p has that this node wants most, until the
// blob is dropped.
func (b *Blob) fetchFrom(p *peer) {
	backoff := 100 * time.Millisecond
	for {
		i, dup, ok := b.next(p)
		if !ok {
			return
		}
		err := b.fetch(p, i, dup)
		<-b.n.fetchSlots
		if dup {
			<-b.n.dupSlots
		}
		b.mu.Lock()
		b.inflight[i]--
		if err != nil && !b.complete[i] {
			b.wakeAllLocked() // another peer may take the piece
		}
		b.mu.Unlock()
		switch {
		case err == nil, errors.Is(err, errPaused), errors.Is(err, errPieceDone):
			backoff = 100 * time.Millisecond
			continue
		case errors.Is(err, errBusy):
			// The peer serves as many as it may: another peer, or this one a little later.
			select {
			case <-time.After(busyBackoff + time.Duration(rand.Int64N(int64(busyBackoff)))):
			case <-p.ctx.Done():
				return
			}
			continue
		case p.ctx.Err() != nil:
			return
		case errors.As(err, new(*writeError)):
			b.mu.Lock()
			report, first := b.onWriteError, !b.writeFailed
			b.writeFailed = true
			b.mu.Unlock()
			if first {
				b.n.cfg.Logger.Error("cannot write into a blob's file; dropping the blob", "blob", b.name, "err", err)
				if report != nil {
					report(err)
				}
				go b.Drop() // not here: Drop waits for this goroutine
			}
			return
		case errors.Is(err, ErrBadPiece):
			b.n.piecesBad.Add(1)
			if b.n.cfg.OnBadPiece != nil {
				b.n.cfg.OnBadPiece(p.addr.Addr())
			}
		}
		b.n.cfg.Logger.Debug("piece fetch failed", "blob", b.name, "piece", i, "peer", p.addr, "err", err)
		select {
		case <-time.After(backoff):
		case <-p.ctx.Done():
			return
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// next waits for a fetch slot and the piece p has that this node wants most and nobody is
// fetching, or in the endgame one to fetch a second time (dup: the caller also releases a
// duplicate slot), and marks the piece in flight; the caller releases the slot. It reports
// false once the blob is dropped or p refused. A worker waiting for a piece holds no slot.
func (b *Blob) next(p *peer) (i int, dup, ok bool) {
	for {
		select {
		case b.n.fetchSlots <- struct{}{}:
		case <-p.ctx.Done():
			return 0, false, false
		}
		b.mu.Lock()
		closed, i, dup := b.closed, -1, false
		retry := time.Second // a refused peer may be allowed again
		if !closed && !b.n.paused() && !b.refused(p.addr) {
			i = b.pickLocked(p)
			if i < 0 {
				var wait time.Duration
				if i, wait = b.pickDuplicateLocked(p); i >= 0 {
					select {
					case b.n.dupSlots <- struct{}{}:
						dup = true
					default:
						i = -1
					}
				} else if wait > 0 {
					retry = min(retry, wait)
				}
			}
		}
		if i >= 0 {
			b.inflight[i]++
		}
		b.mu.Unlock()
		if i >= 0 {
			return i, dup, true
		}
		<-b.n.fetchSlots
		if closed {
			return 0, false, false
		}
		select {
		case <-p.wake:
		case <-p.ctx.Done():
			return 0, false, false
		case <-time.After(retry):
		}
	}
}

// pickDuplicateLocked chooses a piece to fetch from p a second time, in the endgame: once every
// piece this node wants is complete or being fetched, the one p has whose only fetch, from
// another peer, has run longest, if it has run longer than a fetch here usually takes. Whichever
// fetch verifies the piece first completes it and ends the other, so a slow or stalling peer
// holds the blob's last pieces no longer than a faster one needs for them. It returns -1 and,
// when a fetch will have run long enough later, how long until then.
func (b *Blob) pickDuplicateLocked(p *peer) (int, time.Duration) {
	usual := time.Duration(b.n.fetchTime.Load())
	if usual <= 0 {
		usual = b.n.cfg.StallTimeout / 2 // no fetch finished here yet
	}
	usual *= endgameSlowness
	best, oldest, now, left := -1, time.Duration(0), time.Now(), 0
	for i := range b.pieces {
		if !b.wantedLocked(i) || b.complete[i] || b.frozen[i] {
			continue
		}
		if left++; left > endgamePieces || !b.known[i] || b.inflight[i] == 0 {
			return -1, 0 // not the end: more pieces to come, or one waits for its hash or a fetch
		}
		fs := b.fetching[i]
		if !p.has[i] || b.claimed[i] || b.inflight[i] != 1 || len(fs) != 1 || fs[0].peer == p {
			continue
		}
		if age := now.Sub(fs[0].start); best < 0 || age > oldest {
			best, oldest = i, age
		}
	}
	switch {
	case best < 0:
		return -1, 0
	case oldest < usual:
		return -1, usual - oldest
	}
	return best, 0
}

// The endgame begins when a blob has endgamePieces or fewer pieces to come, all being fetched,
// and fetches a piece a second time once its fetch has run endgameSlowness times as long as
// fetches here usually take. A second fetch of a whole piece costs a peer's uplink a piece: at
// N = 32 on this machine's saturated testbed, duplicating whenever all pieces left were in
// flight (up to eight) and slower than usual raised the agents' CPU by a tenth and slowed the
// blob (design-notes.md).
const (
	endgamePieces   = 2
	endgameSlowness = 2
)

// fetchState is one fetch of a piece under way (Blob.fetching).
type fetchState struct {
	peer   *peer
	start  time.Time
	cancel context.CancelCauseFunc
}

// fetchTimeWeight is the weight of the newest fetch in Node.fetchTime's moving average.
const fetchTimeWeight = 0.2

func (n *Node) recordFetchTime(d time.Duration) {
	for {
		old := n.fetchTime.Load()
		next := int64(d)
		if old > 0 {
			next = int64((1-fetchTimeWeight)*float64(old) + fetchTimeWeight*float64(d))
		}
		if n.fetchTime.CompareAndSwap(old, next) {
			return
		}
	}
}

// pickLocked chooses the piece to fetch from p: of those p has, whose hash is known, that are
// neither complete, frozen, unwanted nor in flight, the one of the highest priority; among the
// high ones the first in the blob, among the normal ones the rarest (ties go to a different
// piece for each peer, so that peers are not all asked for the same one).
func (b *Blob) pickLocked(p *peer) int {
	wanted := func(i int) bool {
		return b.wantedLocked(i) && p.has[i] && b.known[i] && !b.complete[i] && !b.frozen[i] && b.inflight[i] == 0
	}
	for r := range b.readers { // what readers wait for, and just after it, first
		first := int(r.pos / b.pieceLength)
		last := int(min(r.pos+r.readahead, b.size-1) / b.pieceLength)
		for i := first; i <= last && i < b.pieces; i++ {
			if wanted(i) {
				return i
			}
		}
	}
	best, bestPrio, bestAvail := -1, PriorityNone, 0
	spread := int(p.addr.Port()) + int(p.addr.Addr().As16()[15])*7919
	start := 0
	if b.pieces > 0 {
		start = spread % b.pieces
	}
	for j := range b.pieces {
		i := (start + j) % b.pieces
		pr := b.prio[i]
		if !wanted(i) {
			continue
		}
		switch {
		case best < 0, pr > bestPrio:
			best, bestPrio, bestAvail = i, pr, b.avail[i]
		case pr != bestPrio:
		case pr == PriorityNormal && b.avail[i] < bestAvail:
			best, bestAvail = i, b.avail[i]
		case pr > PriorityNormal && i < best:
			best = i
		}
	}
	return best
}

// fetch gets piece i from p into the blob's file, hashing it as it arrives, and marks it
// complete if it matches its hash. A second fetch in the endgame (dup) keeps the piece in
// memory and writes it only once verified, and only if the first has not completed it: the
// bytes of a piece come from one peer, checked, whichever it is.
func (b *Blob) fetch(p *peer, i int, dup bool) error {
	ctx, cancel := context.WithCancelCause(p.ctx)
	defer cancel(nil)
	if b.n.paused() {
		return errPaused
	}
	st := &fetchState{peer: p, start: time.Now(), cancel: cancel}
	b.mu.Lock()
	if b.complete[i] {
		b.mu.Unlock()
		return errPieceDone
	}
	b.fetching[i] = append(b.fetching[i], st)
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.fetching[i] = slices.DeleteFunc(b.fetching[i], func(f *fetchState) bool { return f == st })
		b.mu.Unlock()
	}()
	if dup {
		b.n.dups.Add(1)
	}
	url := fmt.Sprintf("http://%s%s?blob=%s&index=%d", p.addr, PiecePath, b.name, i)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	var sock syscall.RawConn
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) { sock = sockwater.Socket(info.Conn) },
	}))
	stall := time.AfterFunc(b.n.cfg.StallTimeout, func() { cancel(errStalled) })
	defer stall.Stop()
	resp, err := b.n.cfg.Client.Do(req)
	if err != nil {
		return orCause(ctx, err)
	}
	defer resp.Body.Close()
	length := b.length(i)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		b.mu.Lock()
		b.setHasLocked(p, i, false) // it does not have it (any more)
		b.mu.Unlock()
		return fmt.Errorf("peer %s does not have piece %d", p.addr, i)
	case resp.StatusCode == http.StatusServiceUnavailable:
		return errBusy
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("peer %s: piece %d: %s", p.addr, i, resp.Status)
	case resp.ContentLength != length:
		return fmt.Errorf("peer %s: piece %d: %d bytes, want %d", p.addr, i, resp.ContentLength, length)
	}
	bufp, _ := bufPool.Get().(*[]byte)
	defer bufPool.Put(bufp)
	buf := *bufp
	var piece []byte // a second fetch's copy of the piece
	if dup {
		piece = make([]byte, length)
	}
	h := sha1.New() //nolint:gosec // see the import
	off := int64(i) * b.pieceLength
	water := 1
	defer func() {
		if water != 1 {
			sockwater.Set(sock, 1)
		}
	}()
	for got := int64(0); got < length; {
		want, most := sockwater.Next(length-got, len(buf))
		if want != water {
			sockwater.Set(sock, want)
			water = want
		}
		chunk := min(int64(most), length-got)
		if lim := b.n.downLimiter; lim != nil {
			chunk = min(chunk, downloadSlice)
			stall.Stop() // waiting for the cap is no stall of the peer's
			err := lim.WaitN(ctx, int(chunk))
			stall.Reset(b.n.cfg.StallTimeout)
			if err != nil {
				return orCause(ctx, err)
			}
		}
		// One read at a time: the low water mark must drop before the piece's last bytes.
		into := buf[:chunk]
		if dup {
			into = piece[got : got+chunk]
		}
		n, err := resp.Body.Read(into)
		if n > 0 {
			stall.Reset(b.n.cfg.StallTimeout)
			h.Write(into[:n])
			if !dup {
				if err := b.writeAt(i, into[:n], off+got); err != nil {
					return err
				}
			}
			got += int64(n)
		}
		if err != nil && got < length {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return orCause(ctx, err)
		}
	}
	if dup {
		b.mu.Lock()
		good := [HashSize]byte(h.Sum(nil)) == b.hashes[i]
		b.mu.Unlock()
		if !good {
			return fmt.Errorf("peer %s: piece %d: %w", p.addr, i, ErrBadPiece)
		}
		if err := b.commitCopy(i, piece, off); err != nil {
			return err
		}
		b.n.dupsWon.Add(1)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !dup {
		switch {
		case [HashSize]byte(h.Sum(nil)) != b.hashes[i]:
			return fmt.Errorf("peer %s: piece %d: %w", p.addr, i, ErrBadPiece)
		case b.frozen[i]:
			return nil
		case b.complete[i], b.claimed[i]:
			return errPieceDone // a second fetch won, with the same bytes
		}
		b.markCompleteLocked(i)
		b.notifyLocked()
	}
	b.n.recordFetchTime(time.Since(st.start))
	b.n.piecesGood.Add(1)
	b.n.bytesIn.Add(length)
	b.bytesIn.Add(length)
	if b.n.cfg.OnData != nil {
		b.n.cfg.OnData(p.addr.Addr())
	}
	return nil
}

// writeAt writes bytes of piece i unless it is frozen (Freeze waits for writes under way).
func (b *Blob) writeAt(i int, p []byte, off int64) error {
	b.fileMu.RLock()
	defer b.fileMu.RUnlock()
	b.mu.Lock()
	frozen, closed, done := b.frozen[i], b.closed, b.complete[i] || b.claimed[i]
	b.mu.Unlock()
	switch {
	case closed:
		return errClosed
	case frozen:
		return fmt.Errorf("piece %d: its bytes come from elsewhere now", i)
	case done:
		return errPieceDone
	}
	return b.write(p, off)
}

// write writes p at off into the blob's file; the caller holds fileMu (shared or exclusive).
func (b *Blob) write(p []byte, off int64) error {
	if b.writer == nil {
		return errors.New("blob is read-only")
	}
	if _, err := b.writer.WriteAt(p, off); err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) { // the disk's: full, failing
			return &writeError{err}
		}
		return err
	}
	return nil
}

// commitCopy writes piece i, verified in memory by an endgame fetch, into the blob's file and
// marks it complete, unless another fetch completed it first (errPieceDone). The first fetch's
// writes stop once the piece is claimed, and those under way finish before the copy is
// written, so the file holds the verified bytes.
func (b *Blob) commitCopy(i int, piece []byte, off int64) error {
	b.mu.Lock()
	if b.complete[i] || b.claimed[i] || b.frozen[i] || b.closed {
		b.mu.Unlock()
		return errPieceDone
	}
	b.claimed[i] = true
	b.mu.Unlock()
	b.fileMu.Lock() // writes under way finish; later ones see the claim
	b.mu.Lock()
	gone := b.frozen[i] || b.closed // Freeze holds fileMu too: no write after it returned
	b.mu.Unlock()
	err := errPieceDone
	if !gone {
		err = b.write(piece, off)
	}
	b.fileMu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.claimed[i] = false
	if err != nil {
		return err
	}
	if b.frozen[i] || b.closed {
		return errPieceDone
	}
	b.markCompleteLocked(i)
	b.notifyLocked()
	return nil
}

// writeError is a write into the blob's file that failed on the disk.
type writeError struct{ err error }

func (e *writeError) Error() string { return "write blob file: " + e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// OnWriteError sets what is told when the disk fails a write into the blob's file (it is full,
// say); the blob is dropped then, as nothing more can be fetched into it. Set it right after
// AddBlob.
func (b *Blob) OnWriteError(f func(error)) {
	b.mu.Lock()
	b.onWriteError = f
	b.mu.Unlock()
}

// orCause returns the cause of ctx's end (a stall, say) instead of err when it has ended.
func orCause(ctx context.Context, err error) error {
	if cause := context.Cause(ctx); cause != nil {
		return cause
	}
	return err
}

// setHasLocked records whether p has piece i.
func (b *Blob) setHasLocked(p *peer, i int, has bool) {
	if p.has[i] == has {
		return
	}
	p.has[i] = has
	if has {
		b.avail[i]++
		b.wakeLocked(p)
	} else {
		b.avail[i]--
	}
}

// Holders counts the peers followed that have piece i, leaving out those skip (if not nil) says
// to.
func (b *Blob) Holders(i int, skip func(netip.Addr) bool) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i < 0 || i >= b.pieces {
		return 0
	}
	if skip == nil {
		return b.avail[i]
	}
	n := 0
	for _, p := range b.peers {
		if p.has[i] && !skip(p.addr.Addr()) {
			n++
		}
	}
	return n
}

// ServeHTTP serves the node's endpoints.
func (n *Node) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		http.Error(w, "unknown peer address", http.StatusBadRequest)
		return
	}
	peer := ap.Addr().Unmap()
	if n.cfg.Refused != nil && n.cfg.Refused(peer) {
		http.Error(w, "refused", http.StatusForbidden)
		return
	}
	name := r.URL.Query().Get("blob")
	if !validName(name) {
		http.Error(w, "blob: want the 64 lowercase hex digits of a sha256 digest", http.StatusBadRequest)
		return
	}
	b := n.blob(name)
	switch r.URL.Path {
	case PiecePath:
		i, err := strconv.Atoi(r.URL.Query().Get("index"))
		if err != nil || b != nil && (i < 0 || i >= b.pieces) {
			http.Error(w, "index: want a piece number of the blob", http.StatusBadRequest)
			return
		}
		if b == nil || !b.PieceComplete(i) {
			http.Error(w, "piece not here", http.StatusNotFound)
			return
		}
		b.servePiece(w, i)
	case HavesPath:
		if b == nil {
			http.Error(w, "blob not here", http.StatusNotFound)
			return
		}
		b.serveHaves(w, r, peer)
	default:
		http.NotFound(w, r)
	}
}

func validName(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// servePiece sends verified piece i from the blob's data: with sendfile through a file opened
// anew (its own offset) when the data is a file, in slices when uploads are rate-limited.
func (b *Blob) servePiece(w http.ResponseWriter, i int) {
	select {
	case b.n.uploadSlots <- struct{}{}:
		defer func() { <-b.n.uploadSlots }()
	default:
		b.n.busy.Add(1)
		http.Error(w, "serving as many pieces as it may; ask again", http.StatusServiceUnavailable)
		return
	}
	length := b.length(i)
	off := int64(i) * b.pieceLength
	src, closeSrc, err := b.openPiece(off, length)
	if err != nil {
		http.Error(w, "blob file: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer closeSrc()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(length, 10))
	w.WriteHeader(http.StatusOK)
	for sent := int64(0); sent < length; {
		n := length - sent
		if b.n.limiter != nil {
			n = min(n, uploadSlice)
			if err := b.n.limiter.WaitN(b.ctx, int(n)); err != nil {
				return
			}
		}
		m, err := io.Copy(w, &io.LimitedReader{R: src, N: n})
		sent += m
		b.n.bytesOut.Add(m)
		b.bytesOut.Add(m)
		if err != nil || m < n {
			return
		}
	}
}

// Reopener is data that can open a new file description of itself (torrent.File): sendfile
// needs one with an offset of its own.
type Reopener interface {
	Reopen() (*os.File, error)
}

// openPiece returns a reader of the length bytes of the blob at off: a file of its own
// positioned there (so io.Copy to a connection uses sendfile) when the data is a Reopener, else
// a section of the data.
func (b *Blob) openPiece(off, length int64) (io.Reader, func(), error) {
	b.fileMu.RLock()
	defer b.fileMu.RUnlock()
	if b.data == nil {
		return nil, nil, errClosed
	}
	if ro, ok := b.data.(Reopener); ok {
		if f, err := ro.Reopen(); err == nil {
			if _, err := f.Seek(off, io.SeekStart); err != nil {
				_ = f.Close()
				return nil, nil, err
			}
			return f, func() { _ = f.Close() }, nil
		}
	}
	return io.NewSectionReader(b.data, off, length), func() {}, nil
}

// Reader reads verified bytes of a blob in order: a read waits for the piece at its position to
// be verified, and the pieces from its position to readahead bytes after it are fetched before
// any other.
type Reader struct {
	b         *Blob
	readahead int64
	pos       int64 // under b.mu
}

// NewReader returns a reader at the blob's start.
func (b *Blob) NewReader(readahead int64) *Reader {
	r := &Reader{b: b, readahead: readahead}
	b.mu.Lock()
	b.readers[r] = struct{}{}
	b.wakeAllLocked()
	b.mu.Unlock()
	return r
}

// ReadContext reads at the reader's position, waiting until ctx ends for verified bytes.
func (r *Reader) ReadContext(ctx context.Context, p []byte) (int, error) {
	b := r.b
	b.mu.Lock()
	pos := r.pos
	b.mu.Unlock()
	if pos >= b.size {
		return 0, io.EOF
	}
	i := int(pos / b.pieceLength)
	if err := b.WaitPiece(ctx, i); err != nil {
		return 0, err
	}
	end := int64(i)*b.pieceLength + b.length(i)
	b.fileMu.RLock()
	var n int
	var err error
	if b.data == nil {
		err = errClosed
	} else {
		n, err = b.data.ReadAt(p[:min(int64(len(p)), end-pos)], pos)
	}
	b.fileMu.RUnlock()
	if errors.Is(err, io.EOF) && n > 0 {
		err = nil
	}
	b.mu.Lock()
	r.pos += int64(n)
	b.mu.Unlock()
	return n, err
}

// Seek sets the reader's position (io.SeekStart or io.SeekCurrent).
func (r *Reader) Seek(offset int64, whence int) (int64, error) {
	b := r.b
	b.mu.Lock()
	defer b.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.pos
	default:
		return r.pos, errors.New("seek: only from the start or the current position")
	}
	if offset < 0 {
		return r.pos, errors.New("seek: negative position")
	}
	r.pos = offset
	b.wakeAllLocked()
	return offset, nil
}

// Close releases the reader: its pieces are no longer fetched first.
func (r *Reader) Close() error {
	r.b.mu.Lock()
	delete(r.b.readers, r)
	r.b.mu.Unlock()
	return nil
}
