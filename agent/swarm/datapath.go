package swarm

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/piecewire"
	"github.com/shoal-dev/shoal/agent/torrent"
)

// Data paths: how the pieces of a blob move between agents (Config.DataPath).
const (
	// DataPathTorrent trades pieces with the BitTorrent client of agent/torrent.
	DataPathTorrent = "torrent"
	// DataPathPieces fetches each piece whole over HTTP and serves it with sendfile
	// (agent/piecewire).
	DataPathPieces = "pieces"
)

// dataPath moves the pieces of blobs between this node and its peers. The segments, their
// seeders and infos, the reader that follows a blob in order and the content store are the
// swarm's own and the same whichever path is used.
type dataPath interface {
	// AddBlob adds the pieces of a blob stored in file; it trades no piece before SetHashes.
	AddBlob(name string, length, pieceLength int64, file *torrent.File, onWriteError func(error)) (blobPieces, error)
	// Pause stops downloads from peers (those under way too) until Resume.
	Pause()
	Resume()
	// CloseDisallowed drops the peers that are no longer members.
	CloseDisallowed()
	IsBanned(netip.Addr) bool
	Stats() torrent.Stats
	// Handler serves the path's HTTP endpoints on the control port (nil: none).
	Handler() http.Handler
	Close() error
}

// blobPieces is one blob's pieces on this node (see torrent.Torrent, whose methods these are).
type blobPieces interface {
	SetHashes(first int, pieces []byte, state torrent.CompletionState)
	SetPriority(from, to int, prio torrent.Priority)
	RaisePriority(from, to int, prio torrent.Priority)
	SetHorizon(h int)
	CompleteIfHash(i int, hash []byte) bool
	MarkVerified()
	Freeze(from, to int)
	Lose(i int)
	IsFrozen(i int) bool
	PieceComplete(i int) bool
	PiecePartial(i int) bool
	Holders(i int, skip func(netip.Addr) bool) int
	PieceReport(i int, skip func(netip.Addr) bool) slog.Attr
	Kick(i int) bool
	AddPeers([]netip.AddrPort)
	Stats() torrent.TorrentStats
	BytesCompleted() int64
	Complete() <-chan struct{}
	Closed() <-chan struct{}
	Drop()
	NewReader(ctx context.Context, readahead int64) pieceReader
}

// pieceReader reads a blob's verified bytes in order.
type pieceReader interface {
	ReadContext(ctx context.Context, p []byte) (int, error)
	Seek(offset int64, whence int) (int64, error)
	Close() error
}

// torrentPath is the BitTorrent client's data path.
type torrentPath struct{ *torrent.Client }

func (p torrentPath) AddBlob(name string, length, pieceLength int64, file *torrent.File, onWriteError func(error)) (blobPieces, error) {
	t, err := p.Client.AddBlob(name, length, pieceLength, file, onWriteError)
	if err != nil {
		return nil, err
	}
	return torrentPieces{t}, nil
}

func (torrentPath) Handler() http.Handler { return nil }

type torrentPieces struct{ *torrent.Torrent }

func (t torrentPieces) NewReader(ctx context.Context, readahead int64) pieceReader {
	return t.Torrent.NewReader(ctx, readahead)
}

// piecesPath is agent/piecewire's data path.
type piecesPath struct {
	node    *piecewire.Node
	allowed func(netip.Addr) bool
	bans    banList
	onBan   func(netip.Addr, time.Duration)
	bad     atomic.Int64
}

// banDuration is how long a peer that sent a piece failing its hash is refused, as the torrent
// path's bans (a repaired member comes back without a restart of the others).
const banDuration = 30 * time.Minute

func newPiecesPath(cfg Config, self netip.AddrPort, onData func(netip.Addr), onBan func(netip.Addr, time.Duration)) *piecesPath {
	p := &piecesPath{allowed: cfg.Membership.Allowed, onBan: onBan}
	p.node = piecewire.NewNode(piecewire.Config{
		// Its own connections: a piece fetch holds one for the piece's time on the link, and a
		// haves stream one for as long as the blob is fetched. A dial may wait behind a full
		// uplink's queue (the peer's answer queues behind the pieces it sends): the control
		// requests' 300 ms failed dials at N = 32 and sent their pieces back to upstream, so a
		// dial gets as long as a piece may stall.
		Client: &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: pieceStallTimeout, LocalAddr: membership.LocalAddr(self)}).DialContext,
			MaxIdleConnsPerHost: 4,
			IdleConnTimeout:     time.Minute,
		}},
		StallTimeout:    pieceStallTimeout,
		MaxUploadRate:   cfg.MaxUploadRate,
		MaxDownloadRate: cfg.MaxDownloadRate,
		Refused:         p.refused,
		OnBadPiece:      p.ban,
		OnData:          onData,
		Logger:          cfg.Logger,
	})
	return p
}

// pieceStallTimeout abandons a piece fetch that moved no byte for this long: the piece is asked
// of another peer. A 1 MiB piece takes 0.08 s on a 100 Mbit/s link to itself, and a link shared
// by 20 fetches 1.7 s.
const pieceStallTimeout = 3 * time.Second

func (p *piecesPath) refused(ip netip.Addr) bool {
	return (p.allowed != nil && !p.allowed(ip)) || p.bans.banned(ip)
}

func (p *piecesPath) ban(ip netip.Addr) {
	p.bad.Add(1)
	if p.bans.add(ip, time.Now().Add(banDuration)) && p.onBan != nil {
		p.onBan(ip, banDuration)
	}
	p.node.CloseRefused()
}

func (p *piecesPath) AddBlob(name string, length, pieceLength int64, file *torrent.File, onWriteError func(error)) (blobPieces, error) {
	b, err := p.node.AddBlob(name, length, pieceLength, file, file)
	if err != nil {
		return nil, err
	}
	b.OnWriteError(onWriteError)
	return &piecesBlob{b: b, file: file, closed: make(chan struct{})}, nil
}

func (p *piecesPath) Pause()                      { p.node.Pause() }
func (p *piecesPath) Resume()                     { p.node.Resume() }
func (p *piecesPath) CloseDisallowed()            { p.node.CloseRefused() }
func (p *piecesPath) IsBanned(ip netip.Addr) bool { return p.bans.banned(ip) }
func (p *piecesPath) Handler() http.Handler       { return p.node }
func (p *piecesPath) Close() error                { p.node.Close(); return nil }

func (p *piecesPath) Stats() torrent.Stats {
	st := p.node.Stats()
	return torrent.Stats{PeerBytesRead: st.BytesFromPeers, BytesWritten: st.BytesToPeers, PiecesGood: st.PiecesGood,
		PiecesBad: st.PiecesBad, Duplicates: st.Duplicates, DuplicatesWon: st.DuplicatesWon}
}

// piecesBlob adapts a piecewire.Blob to blobPieces.
type piecesBlob struct {
	b         *piecewire.Blob
	file      *torrent.File
	closeOnce sync.Once
	closed    chan struct{}
}

func (p *piecesBlob) SetHashes(first int, pieces []byte, state torrent.CompletionState) {
	st := piecewire.AllIncomplete
	switch state {
	case torrent.AllComplete:
		st = piecewire.AllComplete
	case torrent.UnknownCompletion:
		st = piecewire.UnknownCompletion
	}
	if err := p.b.SetHashes(first, pieces, st); err != nil {
		panic(fmt.Sprintf("swarm: hashes out of the plan: %v", err)) // the plan checked them
	}
}

func priority(prio torrent.Priority) piecewire.Priority {
	switch prio {
	case torrent.PriorityNormal:
		return piecewire.PriorityNormal
	case torrent.PriorityHigh:
		return piecewire.PriorityHigh
	}
	return piecewire.PriorityNone
}

func (p *piecesBlob) SetPriority(from, to int, prio torrent.Priority) {
	p.b.SetPriority(from, to, priority(prio))
}

func (p *piecesBlob) RaisePriority(from, to int, prio torrent.Priority) {
	p.b.RaisePriority(from, to, priority(prio))
}

func (p *piecesBlob) SetHorizon(h int) { p.b.SetHorizon(h) }

func (p *piecesBlob) CompleteIfHash(i int, hash []byte) bool { return p.b.CompleteIfHash(i, hash) }
func (p *piecesBlob) MarkVerified()                          { p.b.MarkVerified() }
func (p *piecesBlob) Freeze(from, to int)                    { p.b.Freeze(from, to) }
func (p *piecesBlob) Lose(i int)                             { p.b.Lose(i) }
func (p *piecesBlob) IsFrozen(i int) bool                    { return p.b.IsFrozen(i) }
func (p *piecesBlob) PieceComplete(i int) bool               { return p.b.PieceComplete(i) }
func (p *piecesBlob) PiecePartial(i int) bool                { return p.b.PiecePartial(i) }
func (p *piecesBlob) AddPeers(a []netip.AddrPort)            { p.b.AddPeers(a) }
func (p *piecesBlob) BytesCompleted() int64                  { return p.b.BytesCompleted() }
func (p *piecesBlob) Complete() <-chan struct{}              { return p.b.Complete() }
func (p *piecesBlob) Closed() <-chan struct{}                { return p.closed }

// Kick: a piece fetch is asked of a peer the moment the piece is wanted and a peer has it; there
// is no request a peer could sit on unasked.
func (p *piecesBlob) Kick(int) bool { return false }

func (p *piecesBlob) Holders(i int, skip func(netip.Addr) bool) int { return p.b.Holders(i, skip) }

func (p *piecesBlob) PieceReport(i int, skip func(netip.Addr) bool) slog.Attr {
	return slog.Group("piece", "index", i, "complete", p.b.PieceComplete(i), "fetching", p.b.PiecePartial(i),
		"frozen", p.b.IsFrozen(i), "peers_with_it", p.b.Holders(i, skip))
}

func (p *piecesBlob) Stats() torrent.TorrentStats {
	st := p.b.Stats()
	return torrent.TorrentStats{
		PeerBytesRead: st.BytesFromPeers, BytesReadData: st.BytesFromPeers, BytesWritten: st.BytesToPeers,
		PiecesComplete: st.PiecesComplete, PeersKnown: st.Peers, PeersActive: st.PeersFollowed, PeerConns: st.PeersFollowed + st.Streams,
	}
}

func (p *piecesBlob) Drop() {
	p.b.Drop()
	p.closeOnce.Do(func() { close(p.closed) })
}

func (p *piecesBlob) NewReader(_ context.Context, readahead int64) pieceReader {
	return p.b.NewReader(readahead)
}

// banList holds the peers this node banned, until when.
type banList struct {
	mu    sync.Mutex
	until map[netip.Addr]time.Time
}

// add bans ip until t; it reports whether ip was not banned already.
func (l *banList) add(ip netip.Addr, t time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.until == nil {
		l.until = map[netip.Addr]time.Time{}
	}
	was := l.until[ip].After(time.Now())
	l.until[ip] = t
	return !was
}

func (l *banList) banned(ip netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	t, ok := l.until[ip]
	if ok && !t.After(time.Now()) {
		delete(l.until, ip)
		return false
	}
	return ok
}
