// Package swarm lets the agents of a cluster fetch blobs from each other by BitTorrent
// (github.com/anacrolix/torrent), so that a blob leaves its upstream registry about once per
// cluster however many nodes want it at the same moment.
//
// A blob is traded as one torrent, and cut into segments for fetching and hashing. The seeder of
// a segment is the member the balanced rendezvous assignment gives it to: it fetches that byte
// range from upstream (HTTP Range), hashes the pieces, and publishes the segment's info (its
// piece hashes) to whoever asks; it is also the segment's tracker, answering each asker with
// peers that asked before. Peers trade a segment's pieces while later segments are still being
// fetched, so they start receiving long before any seeder has the whole blob. Every byte from a
// peer is checked against its piece hash before it is stored or read, and the content store
// checks the whole blob against its sha256 digest.
//
// One TCP port per node (--p2p-addr) carries both the BitTorrent peer protocol and a small HTTP
// control API (see Split); connections from addresses that are not members are refused.
package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/piecewire"
	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/torrent"
)

// Upstream is what the swarm needs of the registry client: sizes and byte ranges of blobs.
type Upstream interface {
	Blob(ctx context.Context, registry, repo string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error)
	HeadBlob(ctx context.Context, registry, repo string, d v1.Hash) (int64, error)
}

// LocalBlobs gives access to complete blobs of the node's content store, so that a node that
// already holds a blob seeds it from there instead of fetching it upstream again.
type LocalBlobs interface {
	Get(d v1.Hash) (store.Blob, error)
}

// Defaults for the segmentation and timing parameters.
const (
	DefaultSegmentSize = 16 << 20
	DefaultPieceLength = 1 << 20
	// DefaultRampSegments is how many short segments start a blob (see plan.Plan).
	DefaultRampSegments = 4
	// DefaultMinSegments is how many segments a blob is cut into at least, when its pieces
	// allow (see plan.Plan.SegmentLength).
	DefaultMinSegments = 16
	// DefaultUpstreamWindow: with 8 segments fetched at once, every node waited for all 8 to be
	// published together, at 16 MiB / (R/8) after the start (N = 32: 5.4 s, links 12 % busy until
	// then); with 4, the first segments come twice as early, and R = 4·B is still used in full
	// (N = 32 cold, torrent v1.59.1: p99 1.60 against 1.70-1.71).
	DefaultUpstreamWindow = 4
	DefaultInfoTimeout    = 60 * time.Second
	DefaultStallTimeout   = 10 * time.Second
	// chunkSize is the BitTorrent request size: a quarter of the messages, syscalls and
	// bookkeeping of the usual 16 KiB per byte (N = 32: 145 → 118 agent CPU-s, p99 2.02 → 1.70 ×
	// S/B once the request queue per connection was capped; 16 KiB had looked cheaper only while
	// peers queued up to 1024 requests each). 256 KiB was worse again (RSS 350 MiB).
	chunkSize       = 64 << 10
	maxPeerRequests = 1024                    // anacrolix/torrent's request queue per connection (reqq)
	requestsPerConn = (512 << 10) / chunkSize // requests this node keeps outstanding at one peer (512 KiB)
	// peersPerAnswer is how many neighbours a seeder hands each peer of a segment (see
	// neighbours): peers then have about 5 to 10 connections per segment at any cluster size.
	peersPerAnswer      = 5
	announceInterval    = 2 * time.Second
	maxAnnounceInterval = 16 * time.Second
	controlDialTimeout  = 300 * time.Millisecond
	seederRetryPause    = 100 * time.Millisecond
	stealGrace          = 3 * time.Second
	// seederTimeoutsToFail is how many timed-out requests in a row make a live seeder count as
	// failed: about 1.2 s for one that black-holes packets before the next one takes over.
	seederTimeoutsToFail = 3
)

// Config configures a Swarm.
type Config struct {
	// Dir holds the swarm's working files (blobs being downloaded).
	Dir string
	// Membership is the set of agents this node swarms with.
	Membership membership.Membership
	// PeerListener receives BitTorrent connections (the bt side of Split); Close closes it.
	PeerListener net.Listener
	// Upstream fetches byte ranges of blobs the cluster does not have yet.
	Upstream Upstream
	// Local is the node's content store; nil disables seeding from it.
	Local LocalBlobs
	// SegmentSize and PieceLength cut blobs into torrents; every node must use the same values.
	SegmentSize, PieceLength int64
	// RampSegments is how many short segments (a quarter of SegmentSize) start a blob, so that
	// the first segments are published sooner; the same on every node. 0 means
	// DefaultRampSegments, a negative value none.
	RampSegments int
	// MinSegments is how many segments a blob is cut into at least (shorter segments for small
	// blobs, see plan.Plan); the same on every node. 0 means DefaultMinSegments, a negative value
	// segments of SegmentSize for every blob.
	MinSegments int
	// UpstreamWindow is how many segments a node asks seeders for ahead of the first one not yet
	// published: it bounds the upstream fetches running at once, so early segments come first.
	UpstreamWindow int
	// MaxUploadRate and MaxDownloadRate cap peer traffic in bytes per second; 0 = unlimited
	// (the pieces data path caps uploads only).
	MaxUploadRate, MaxDownloadRate int64
	// DataPath is how pieces move between agents: DataPathTorrent ("" too) or DataPathPieces.
	DataPath string
	// ConnsPerTorrent bounds established peer connections per blob torrent.
	ConnsPerTorrent int
	// InfoTimeout bounds waiting for a seeder to publish a segment before fetching it directly.
	InfoTimeout time.Duration
	// StallTimeout is how long the blob may complete no piece while a reader waits before the
	// rest of the reader's segment is fetched directly from upstream (see blobReader.step).
	StallTimeout time.Duration
	// IdleTimeout is how long a blob without readers keeps its torrent after it last
	// moved a byte, and how long a working file no blob uses is kept (see janitor.go).
	IdleTimeout time.Duration
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
}

// Swarm is one node's member of the cluster swarm.
type Swarm struct {
	cfg     Config
	self    netip.AddrPort
	log     *slog.Logger
	client  dataPath
	control *http.Client // protocol 2: headers come at once (see requestSegmentV2)
	// controlV1 is for seeders of the previous release, whose answers come only once the
	// segment is published.
	controlV1 *http.Client
	protocols sync.Map // netip.AddrPort → the older control protocol version a peer speaks
	// ping asks a member's control API whether it is alive (see rescue).
	ping func(ctx context.Context, addr netip.AddrPort) error
	// announcing counts the announce loops running (see announce).
	announcing atomic.Int64
	// noRange holds the registries found to ignore Range (registry → true): their later blobs
	// start out fetched whole, without a failed ranged request per seeder first.
	noRange sync.Map
	// silent holds peers that did not answer a ping, until when (see rescue).
	silent sync.Map
	// heard holds, for every peer IP, when it last sent this node data (unix nanoseconds).
	heard   sync.Map
	metrics *metrics

	mu    sync.Mutex
	blobs map[string]*blob

	// ctx ends when the swarm closes; the swarm's own goroutines (see background) work under it,
	// and Close waits for them.
	ctx      context.Context
	cancel   context.CancelFunc
	lifeMu   sync.Mutex
	closing  bool
	workers  sync.WaitGroup
	runOnce  sync.Once
	closeErr error
	closed   chan struct{} // closed once Close has returned

	// While this node fetches segments from upstream for the cluster, it asks peers for nothing:
	// the upstream fetch then has the node's downlink to itself, and every other node is waiting
	// for that segment to be published.
	seedingMu   sync.Mutex
	seeding     int
	pauses      uint64 // how many times peer downloads were paused
	seedWaiters []*seedWaiter
}

// seedSlot waits until this node may start fetching a segment from upstream. A node fetches
// one segment at a time, lowest segment first: a seeder that owns several segments publishes the
// early ones at the speed of its whole downlink instead of all of them late.
func (s *Swarm) seedSlot(ctx context.Context, k int) (release func(), err error) {
	s.seedingMu.Lock()
	if s.seeding == 0 && len(s.seedWaiters) == 0 {
		s.seedingLocked(+1)
		s.seedingMu.Unlock()
		return s.releaseSeedSlot, nil
	}
	w := &seedWaiter{k: k, ready: make(chan struct{})}
	s.seedWaiters = append(s.seedWaiters, w)
	s.seedingMu.Unlock()
	select {
	case <-w.ready:
		return s.releaseSeedSlot, nil
	case <-ctx.Done():
		s.seedingMu.Lock()
		defer s.seedingMu.Unlock()
		select {
		case <-w.ready: // granted meanwhile: pass it on
			s.seedingLocked(-1)
			s.grantLocked()
		default:
			s.seedWaiters = slices.DeleteFunc(s.seedWaiters, func(x *seedWaiter) bool { return x == w })
		}
		return nil, ctx.Err()
	}
}

type seedWaiter struct {
	k     int
	ready chan struct{}
}

func (s *Swarm) releaseSeedSlot() {
	s.seedingMu.Lock()
	defer s.seedingMu.Unlock()
	s.seedingLocked(-1)
	s.grantLocked()
}

// grantLocked hands a free slot to the waiter with the lowest segment index.
func (s *Swarm) grantLocked() {
	if s.seeding > 0 || len(s.seedWaiters) == 0 {
		return
	}
	next := slices.MinFunc(s.seedWaiters, func(a, b *seedWaiter) int { return a.k - b.k })
	s.seedWaiters = slices.DeleteFunc(s.seedWaiters, func(x *seedWaiter) bool { return x == next })
	s.seedingLocked(+1)
	close(next.ready)
}

// seedingLocked counts upstream fetches in progress and pauses peer downloads meanwhile. Merely
// reading peers' data slowly is not enough: the chunks already requested from dozens of peers
// keep the node's downlink queue full, and a registry's packets wait behind them (measured: a
// 16 MiB segment took 15 s instead of 2). Pausing cancels those requests.
func (s *Swarm) seedingLocked(delta int) {
	before := s.seeding
	s.seeding += delta
	switch {
	case s.seeding == 0:
		s.client.Resume()
	case before == 0:
		s.pauses++
		s.client.Pause()
	}
}

// waitSlice is how long a reader waits for its piece before it looks at its segment's progress
// again (see blobReader.step).
func (s *Swarm) waitSlice() time.Duration {
	return min(time.Second, s.cfg.StallTimeout/3)
}

// pauseState reports whether this node is fetching a segment from upstream (so its peer
// downloads are paused), and how many pauses have begun so far: a reader compares the count
// before and after a read that failed, since a whole pause (a short segment takes well under a
// millisecond on a fast link) can begin and end while the read waits.
func (s *Swarm) pauseState() (seeding bool, pauses uint64) {
	s.seedingMu.Lock()
	defer s.seedingMu.Unlock()
	return s.seeding > 0, s.pauses
}

// New starts the torrent client on cfg.PeerListener.
func New(cfg Config) (*Swarm, error) {
	if cfg.SegmentSize == 0 {
		cfg.SegmentSize = DefaultSegmentSize
	}
	if cfg.PieceLength == 0 {
		cfg.PieceLength = DefaultPieceLength
	}
	switch {
	case cfg.RampSegments == 0:
		cfg.RampSegments = DefaultRampSegments
	case cfg.RampSegments < 0:
		cfg.RampSegments = 0
	}
	switch {
	case cfg.MinSegments == 0:
		cfg.MinSegments = DefaultMinSegments
	case cfg.MinSegments < 0:
		cfg.MinSegments = 0
	}
	if cfg.UpstreamWindow <= 0 {
		cfg.UpstreamWindow = DefaultUpstreamWindow
	}
	if cfg.InfoTimeout <= 0 {
		cfg.InfoTimeout = DefaultInfoTimeout
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = DefaultStallTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.ConnsPerTorrent <= 0 {
		cfg.ConnsPerTorrent = 4 * peersPerAnswer
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if _, err := plan.New(v1.Hash{Algorithm: "sha256"}, 1, cfg.SegmentSize, cfg.PieceLength, cfg.RampSegments, cfg.MinSegments); err != nil {
		return nil, fmt.Errorf("swarm segmentation: %w", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("create swarm directory: %w", err)
	}
	s := &Swarm{
		cfg:    cfg,
		self:   cfg.Membership.Self(),
		log:    cfg.Logger,
		blobs:  map[string]*blob{},
		ping:   membership.NewPinger(cfg.Membership.Self()),
		closed: make(chan struct{}),
		control: &http.Client{Transport: &http.Transport{
			DialContext:           (&net.Dialer{Timeout: controlDialTimeout, LocalAddr: membership.LocalAddr(cfg.Membership.Self())}).DialContext,
			MaxIdleConnsPerHost:   4,
			IdleConnTimeout:       time.Minute,
			ResponseHeaderTimeout: controlHeaderTimeout,
		}},
		controlV1: &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: controlDialTimeout, LocalAddr: membership.LocalAddr(cfg.Membership.Self())}).DialContext,
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     time.Minute,
		}},
	}

	if cfg.DataPath == DataPathPieces {
		s.client = newPiecesPath(cfg, s.self, s.heardFrom, s.banned)
		s.metrics = newMetrics(cfg.Registerer, s)
		s.ctx, s.cancel = context.WithCancel(context.Background())
		return s, nil
	}
	client, err := torrent.NewClient(torrent.Config{
		Dir:             cfg.Dir,
		Self:            s.self,
		Listener:        cfg.PeerListener,
		Allowed:         cfg.Membership.Allowed,
		OnDialFailure:   cfg.Membership.ReportFailure,
		OnData:          s.heardFrom, // data from a peer shows it is alive
		OnBan:           s.banned,
		ChunkSize:       chunkSize,
		RequestsPerConn: requestsPerConn,
		MaxPeerRequests: maxPeerRequests,
		ConnsPerTorrent: cfg.ConnsPerTorrent,
		StealGrace:      stealGrace,
		MaxUploadRate:   cfg.MaxUploadRate,
		MaxDownloadRate: cfg.MaxDownloadRate,
		DialTimeout:     time.Second,
		Logger:          cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	s.client = torrentPath{client}
	s.metrics = newMetrics(cfg.Registerer, s)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Run sweeps idle blobs (see janitor) and, whenever members leave, closes the peer connections
// of those that left (new ones are refused anyway), until ctx ends; then it closes the swarm and
// returns once every goroutine it started has ended. The swarm serves from New on; Run only
// adds that upkeep, so a swarm that is closed without ever running is fine too.
func (s *Swarm) Run(ctx context.Context) error {
	ticker := time.NewTicker(janitorInterval)
	defer ticker.Stop()
	changed := s.cfg.Membership.Changes()
	s.client.CloseDisallowed() // of members that left before Run began
	s.sweep(time.Now())
	for {
		select {
		case <-ctx.Done():
			return s.Close()
		case <-s.ctx.Done():
			<-s.closed
			return s.closeErr
		case <-ticker.C:
			s.sweep(time.Now())
		case <-changed:
			changed = s.cfg.Membership.Changes() // before closing: a later change is seen
			s.client.CloseDisallowed()
		}
	}
}

// Close stops the torrent client and the swarm's goroutines, and returns once they have ended:
// downloads in flight fail and the mirror falls back to upstream.
func (s *Swarm) Close() error {
	s.runOnce.Do(func() {
		s.lifeMu.Lock()
		s.closing = true
		s.lifeMu.Unlock()
		s.cancel()
		// The torrent client accepts until its listener fails; it does not close it itself.
		s.closeErr = errors.Join(s.client.Close(), ignoreClosed(s.cfg.PeerListener.Close()))
		s.workers.Wait()
		s.mu.Lock()
		for _, b := range s.blobs {
			b.file.Close()
		}
		s.blobs = map[string]*blob{}
		s.mu.Unlock()
		close(s.closed)
	})
	<-s.closed
	return s.closeErr
}

func ignoreClosed(err error) error {
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// errSwarmClosed fails work that the swarm is too late to start or finish: it is closing.
var errSwarmClosed = errors.New("the swarm is closed")

// background runs f in a goroutine that Close waits for, unless the swarm is closing; f must
// return soon after s.ctx ends. It reports whether f was started.
func (s *Swarm) background(f func()) bool {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if s.closing {
		return false
	}
	s.workers.Go(f)
	return true
}

// Check takes the swarm's locks and returns: a liveness check, which does not return while
// one of them is held for good.
func (s *Swarm) Check() {
	s.mu.Lock()
	//nolint:staticcheck // SA2001: taking the lock is the check.
	s.mu.Unlock()
	s.seedingMu.Lock()
	//nolint:staticcheck // SA2001: taking the lock is the check.
	s.seedingMu.Unlock()
}

// heardFrom records that peer sent data: it is alive, so the membership need not probe it and a
// rescue need not suspect it.
func (s *Swarm) heardFrom(peer netip.Addr) {
	s.heard.Store(peer.Unmap(), time.Now().UnixNano())
	s.cfg.Membership.ReportAlive(peer)
}

// heardWithin reports whether peer sent this node data within d.
func (s *Swarm) heardWithin(peer netip.Addr, d time.Duration) bool {
	v, ok := s.heard.Load(peer.Unmap())
	if !ok {
		return false
	}
	at, ok := v.(int64)
	return ok && time.Since(time.Unix(0, at)) < d
}

// banned is told of every peer the torrent client bans.
func (s *Swarm) banned(addr netip.Addr, d time.Duration) {
	s.metrics.bans.Inc()
	s.log.Warn("peer sent data that failed verification; banned", "peer", addr, "for", d)
}

// isTimeout reports whether err is a timeout, which proves nothing about a peer: a saturated
// link drops SYNs (Linux sends the next one a second later) and a busy node answers late. The
// membership's probes decide about those; a refused or reset connection counts at once.
func isTimeout(err error) bool { return torrent.IsTimeout(err) }

// blob is this node's swarm state for one blob.
type blob struct {
	// handedOver is set once the torrent serves the content store's copy (see handover).
	handedOver     atomic.Bool
	plan           plan.Plan
	registry, repo string
	file           *torrent.File
	t              blobPieces // the blob's pieces (its torrent): their hashes arrive by segment
	path           string     // the working file; "" once the data lives in the content store
	state          torrent.CompletionState
	segs           []*segment
	assignMu       sync.Mutex  // guards assigned and seedSet
	assigned       *assignment // see Swarm.seedersOf
	// seedSet, when not empty, are the only members that seed the blob's segments (sorted;
	// see SourceWithin).
	seedSet []netip.AddrPort
	// whole: upstream ignores Range, so one member, segment 0's seeder, fetches the whole blob
	// and publishes every segment (see seedWhole).
	whole        atomic.Bool
	wholeHere    atomic.Bool // this node was chosen to fetch the whole blob
	wholeMu      sync.Mutex
	wholeRunning bool
	silent       func(netip.Addr) bool // the swarm's isSilent

	downloadOnce sync.Once
	finishOnce   sync.Once
	started      time.Time

	focusMu sync.Mutex
	focus   map[*blobReader]int // the horizon of each reader holding the others back (see setFocus)

	activityMu sync.Mutex // guards the janitor's view of the blob's activity (see idleSince)
	readers    int
	moved      int64     // bytes in and out of the blob's torrent at the last sweep
	quietSince time.Time // the sweep since which the blob has had no reader and moved nothing
}

// blobFor returns the state of digest d, creating it (and its sparse working file) if needed.
func (s *Swarm) blobFor(d v1.Hash, size int64, registry, repo string) (*blob, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.blobs[d.Hex]; ok {
		if b.plan.Size != size {
			return nil, fmt.Errorf("blob %s: size %d disagrees with the %d already known", d, size, b.plan.Size)
		}
		b.touch()
		return b, nil
	}
	p, err := plan.New(d, size, s.cfg.SegmentSize, s.cfg.PieceLength, s.cfg.RampSegments, s.cfg.MinSegments)
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", d, err)
	}
	path := filepath.Join(s.cfg.Dir, d.Hex)
	// A working file left by an earlier run is resumed: its pieces are verified, not fetched again.
	state := torrent.AllIncomplete
	if fi, err := os.Stat(path); err == nil && fi.Size() == size {
		state = torrent.UnknownCompletion
		s.log.Info("resuming an interrupted download", "digest", d)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("blob %s: open working file: %w", d, err)
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("blob %s: size working file: %w", d, err)
	}
	b := &blob{plan: p, registry: registry, repo: repo, file: torrent.NewFile(f, f, f), path: path, state: state,
		silent: s.isSilent}
	if _, ok := s.noRange.Load(registry); ok {
		b.whole.Store(true)
	}
	for k := range p.Segments() {
		b.segs = append(b.segs, newSegment(k))
	}
	if err := s.addTorrent(b); err != nil {
		b.file.Close()
		return nil, fmt.Errorf("blob %s: %w", d, err)
	}
	s.blobs[d.Hex] = b
	return b, nil
}

// Handler serves the control API that agents use with each other (the http side of Split).
func (s *Swarm) Handler() http.Handler { return s.controlMux() }

func (s *Swarm) controlMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+membership.PingPath, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET "+plan.SegmentPathV1, s.serveSegment)
	mux.HandleFunc("GET "+plan.SegmentPathV2, s.serveSegmentV2)
	if h := s.client.Handler(); h != nil {
		mux.Handle("GET "+piecewire.PiecePath, h)
		mux.Handle("GET "+piecewire.HavesPath, h)
	}
	return mux
}
