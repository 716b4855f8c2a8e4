// Package torrent is Shoal's only door to github.com/anacrolix/torrent: it runs the BitTorrent
// client of a node's swarm with the settings a datacenter swarm needs, stores each blob's
// torrent in one file whose piece hashes arrive segment by segment (see storage.go), and holds
// every dependency on how the client behaves beyond its documented API. Each has a test of the
// behaviour relied on, through real transfers between clients on loopback addresses:
//
//   - the request window written through an unexported field (requestwindow.go) and the queue
//     depth rewritten in each peer's extended handshake: TestRequestWindowIsHeldDuringATransfer;
//   - pausing through DisallowDataDownload, and the priority refresh that avoids a panic of the
//     client on resume (Client.Pause): TestPauseStopsDownloadsUntilResume;
//   - pieces completed by another path (CompleteIfHash, MarkVerified, Lose) and the completion
//     "kick" (Torrent.Kick), which rely on the client re-reading a piece's completion from the
//     storage: TestPieceCompletedByAnotherPathIsSeen, TestKickMakesPeersSendAPiece,
//     TestLostPieceIsFetchedAgain;
//   - the demotion of some of its log records by message text (log.go), and the chunk writes
//     refused by frozen pieces, which must not drop the torrent:
//     TestLateChunksOfAFrozenPieceAreDemoted, TestReaderTimeoutsAreNotLogged;
//   - the types of a peer's address the client hands its callbacks (peerIP):
//     TestDataFromPeersIsReported;
//   - the bans of peers that send bad data, all the adapter's own and expiring, which relies on
//     the client banning nobody for a piece whose check fails with an error (ban.go):
//     TestCorruptPieceBanExpires;
//   - the refusal of peers that are not members, through the client's IP block list, and the
//     closing of their connections under the client, which drops a connection whose socket
//     fails whether or not its handshakes are over (conns.go): TestNonMembersAreBlocked,
//     TestPeersNoLongerAllowedAreDisconnected.
//
// TestClientVersionIsTheVerifiedOne fails when the client's version in go.mod changes, so that
// an upgrade re-verifies them all.
package torrent

import (
	"context"
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes are SHA-1; blobs are verified by sha256 too
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/bencode"
	"github.com/anacrolix/torrent/metainfo"
	"github.com/anacrolix/torrent/mse"
	pp "github.com/anacrolix/torrent/peer_protocol"
	"golang.org/x/time/rate"
)

// HashSize is the length of a BitTorrent v1 piece hash (SHA-1).
const HashSize = sha1.Size

// sha1Size is HashSize under the name the storage code uses.
const sha1Size = HashSize

// Config configures a Client.
type Config struct {
	// Dir is the client's data directory (it keeps no state there that matters).
	Dir string
	// Self is the node's peer address: connections to peers come from its IP.
	Self netip.AddrPort
	// Listener receives BitTorrent connections; the client does not listen itself.
	Listener net.Listener
	// Allowed reports whether a peer IP may be connected with (members only; nil allows every
	// peer): the client neither dials nor accepts the others, and CloseDisallowed drops those
	// already connected once Allowed refuses them.
	Allowed func(netip.Addr) bool
	// OnDialFailure is told of a peer whose dial failed for another reason than a timeout.
	OnDialFailure func(netip.AddrPort)
	// OnData is told of every peer that sent useful data (it is alive).
	OnData func(netip.Addr)
	// OnBan is told of every peer this node bans, and for how long.
	OnBan func(netip.Addr, time.Duration)
	// ChunkSize is the size of a request; RequestsPerConn how many this node keeps outstanding
	// at a peer; MaxPeerRequests how many a peer may have outstanding at this node.
	ChunkSize, RequestsPerConn, MaxPeerRequests int
	// ConnsPerTorrent bounds established peer connections per torrent.
	ConnsPerTorrent int
	// StealGrace is how old a request must be before it moves to another connection.
	StealGrace time.Duration
	// MaxUploadRate and MaxDownloadRate cap peer traffic in bytes per second; 0 = unlimited.
	MaxUploadRate, MaxDownloadRate int64
	// DialTimeout bounds dialling a peer.
	DialTimeout time.Duration
	Logger      *slog.Logger

	// now is the clock of bans (time.Now if nil); tests set it.
	now func() time.Time
	// tune, if set, changes the torrent client's configuration last; tests use it to watch the
	// client through its callbacks.
	tune func(*torrent.ClientConfig)
}

// Client is a node's BitTorrent client.
type Client struct {
	cfg       Config
	c         *torrent.Client
	banned    bannedIPs
	conns     connSet      // see CloseDisallowed
	piecesBad atomic.Int64 // see Stats
	readBacks atomic.Int64 // see Stats
	log       *slog.Logger

	torrents sync.Map // *torrent.Torrent → *Torrent

	pauseMu sync.Mutex
	paused  bool

	bgMu       sync.Mutex
	closing    bool
	background sync.WaitGroup // the adapter's own goroutines (goBackground)
}

// NewClient starts a client on cfg.Listener.
func NewClient(cfg Config) (*Client, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, log: cfg.Logger}
	c.banned.clock = cfg.now
	cc := torrent.NewDefaultClientConfig()
	cc.Slogger = slog.New(torrentLogHandler{cfg.Logger.Handler()}).With("component", "torrent")
	cc.DataDir = cfg.Dir
	cc.Seed = true
	cc.NoDHT = true
	cc.DisableUTP = true
	cc.DisableTCP = true // the swarm hands the client its own listener and dialer
	cc.DisableTrackers = true
	cc.DisableWebtorrent = true
	cc.DisableWebseeds = true
	cc.DisablePEX = true // peers come from segments' seeders only, bounded in number
	cc.NoDefaultPortForwarding = true
	cc.DisableIPv6 = !cfg.Self.Addr().Is6()
	cc.HeaderObfuscationPolicy = torrent.HeaderObfuscationPolicy{Preferred: false, RequirePreferred: true}
	cc.CryptoProvides = mse.CryptoMethodPlaintext
	cc.NominalDialTimeout = time.Second
	cc.MinDialTimeout = 300 * time.Millisecond
	cc.HandshakesTimeout = 2 * time.Second
	cc.EstablishedConnsPerTorrent = cfg.ConnsPerTorrent
	cc.HalfOpenConnsPerTorrent = cfg.ConnsPerTorrent / 2
	cc.TotalHalfOpenConns = 128
	cc.DialRateLimiter = rate.NewLimiter(200, 200)
	// One connection per pair of nodes per torrent: duplicates waste sockets.
	cc.DropDuplicatePeerIds = true
	// A request younger than StealGrace stays with the peer it was sent to. The client otherwise
	// moves requests between connections whenever another one looks better by one request, and a
	// moved request that its first peer had already answered arrives twice (N = 32: 451 wasted
	// 64 KiB chunks per node, 11 % of the blob; 265 with 1 s; 71 with 3 s).
	cc.StealRequestGrace = cfg.StealGrace
	// The client considers pieces for requests in its order (priority, then rarest first) only
	// until 64 MiB of them by default. In a blob's torrent the rarest pieces are those of segments
	// whose holders this node is not connected to, so those 64 MiB could be pieces no peer can
	// send while every other piece waits: a node alone stopped dead after 80 MiB.
	cc.MaxUnverifiedBytes = 0
	// No fast extension (BEP 6). With it, a cancelled request stays pending until the peer
	// rejects it, the client re-requests nothing on a rejection, and the 3 s request timer skips
	// a connection without requests: a Resume that comes less than a round trip after Pause (a
	// short segment from the registry) left the connection idle until some other event on it,
	// 30 s in TestQuickPauseResumeKeepsTransferring. Between agents the extension brings nothing
	// else the swarm uses (every peer is unchoked; there is no allowed-fast set to speak of).
	cc.Extensions.SetBit(pp.ExtensionBitFast, false)
	// The client reserves buffer space for every request a peer makes and serves them in no
	// particular order; a limit below what one peer can have outstanding deadlocks the connection
	// (a request waits for space held by earlier ones it is itself blocking). So the limit is what
	// a peer can ask for at once: the client's request queue times the chunk size.
	cc.MaxAllocPeerRequestDataPerConn = cfg.MaxPeerRequests * cfg.ChunkSize
	// Data from a peer shows it is alive. Every block is recorded until its piece verifies, to
	// find who sent bad data (see ban.go).
	cc.Callbacks.ReceivedUsefulData = append(cc.Callbacks.ReceivedUsefulData, c.reportData, c.recordSentBlock)
	cc.IPBlocklist = blocklist{banned: &c.banned, allowed: cfg.Allowed}
	// A peer serves requests in the order they arrive, so the deeper the queue this node keeps at
	// a peer, the longer the piece its reader waits for sits behind others: the client queues up
	// to the peer's advertised "reqq" (1024 chunks, 64 MiB, between two of these clients). Capped
	// at RequestsPerConn, which still covers the bandwidth-delay product of a node's link spread
	// over its several connections, and bounds the buffers a peer allocates to serve this node
	// (N = 32: 1 MiB gave p99 1.66-1.69 and peak RSS 176-196 MiB, 512 KiB 1.60 and 144 MiB,
	// 256 KiB 1.67 with more stalls).
	perConn := cfg.RequestsPerConn
	cc.Callbacks.ReadExtendedHandshake = func(_ *torrent.PeerConn, m *pp.ExtendedHandshakeMessage) {
		m.Reqq = perConn
	}
	// Keep RequestsPerConn outstanding on every connection (see requestwindow.go).
	if canHoldRequestWindow() {
		cc.Callbacks.ReadMessage = func(pc *torrent.PeerConn, _ *pp.Message) {
			holdRequestWindow(pc, perConn)
		}
	} else {
		c.log.Warn("cannot hold the torrent client's request window; connections may run with one or two requests outstanding")
	}
	if cfg.MaxUploadRate > 0 {
		cc.UploadRateLimiter = rate.NewLimiter(rate.Limit(cfg.MaxUploadRate), 256<<10)
	}
	if cfg.MaxDownloadRate > 0 {
		cc.DownloadRateLimiter = rate.NewLimiter(rate.Limit(cfg.MaxDownloadRate), 1<<20)
	}
	if cfg.tune != nil {
		cfg.tune(cc)
	}
	client, err := torrent.NewClient(cc)
	if err != nil {
		return nil, fmt.Errorf("start torrent client: %w", err)
	}
	c.c = client
	client.AddDialer(peerDialer{cfg: cfg, local: net.TCPAddrFromAddrPort(netip.AddrPortFrom(cfg.Self.Addr(), 0)), conns: &c.conns})
	client.AddListener(trackingListener{Listener: cfg.Listener, conns: &c.conns})
	return c, nil
}

// Close stops the client; its torrents stop, and its connections close, those still in their
// handshakes too (the torrent client leaves them to their deadline). It returns once the
// adapter's goroutines have ended. The torrent client's accept loop ends when Config.Listener
// is closed, which must happen after Close: the loop spins on a closed listener while the
// client is open.
func (c *Client) Close() error {
	c.bgMu.Lock()
	c.closing = true
	c.bgMu.Unlock()
	err := errors.Join(c.c.Close()...)
	c.conns.closeIf(func(netip.Addr) bool { return true })
	c.background.Wait()
	return err
}

// goBackground runs f in a goroutine that Close waits for (f must end once the torrent client
// is closed), unless the client is closing.
func (c *Client) goBackground(f func()) {
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	if !c.closing {
		c.background.Go(f)
	}
}

// CloseDisallowed closes the connections of peers that Config.Allowed refuses now, those still in
// their handshakes included: call it when its answers change (a member left the swarm). New
// connections are refused anyway.
func (c *Client) CloseDisallowed() {
	if c.cfg.Allowed != nil {
		c.conns.closeIf(func(ip netip.Addr) bool { return !c.cfg.Allowed(ip) })
	}
}

func (c *Client) reportData(ev torrent.ReceivedUsefulDataEvent) {
	if addr, ok := peerIP(ev.Peer.RemoteAddr); ok && c.cfg.OnData != nil {
		c.cfg.OnData(addr)
	}
}

// peerDialer dials peers for the client, refusing any address that is not allowed (peer
// exchange could otherwise name one).
type peerDialer struct {
	cfg   Config
	local *net.TCPAddr
	conns *connSet
}

func (d peerDialer) DialerNetwork() string { return "tcp" }

func (d peerDialer) Dial(ctx context.Context, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial peer %s: %w", addr, err)
	}
	if d.cfg.Allowed != nil && !d.cfg.Allowed(ap.Addr()) {
		return nil, fmt.Errorf("dial peer %s: not a member", addr)
	}
	conn, err := (&net.Dialer{Timeout: max(d.cfg.DialTimeout, time.Second), LocalAddr: d.local}).DialContext(ctx, "tcp", addr)
	if err != nil {
		if !IsTimeout(err) && d.cfg.OnDialFailure != nil {
			d.cfg.OnDialFailure(ap)
		}
		return nil, err
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0) // as the torrent client does to the TCP connections it sees
	}
	tracked := d.conns.add(conn, ap.Addr())
	// Checked again once tracked: a CloseDisallowed during the dial did not see the connection.
	if d.cfg.Allowed != nil && !d.cfg.Allowed(ap.Addr()) {
		_ = tracked.Close()
		return nil, fmt.Errorf("dial peer %s: not a member any more", addr)
	}
	return tracked, nil
}

// IsTimeout reports whether err is a timeout, which proves nothing about a peer: a saturated
// link drops SYNs (Linux sends the next one a second later) and a busy node answers late.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// Pause stops every torrent from asking peers for data (their outstanding requests are
// cancelled) until Resume, and makes torrents added meanwhile start paused. The client drops a
// torrent's pieces from its request order while downloads are disallowed but keeps them
// pending, and panics, at AllowDataDownload, if it checks the two against each other before it
// has re-added them all (v1.62.0, assertPendingPiecesMatchRequestOrder); setting every piece's
// priority again right after pausing updates both (refreshPriorities).
//
// Pause and Resume may follow each other within a round trip: the client runs without the fast
// extension, whose pending cancels would hold a quickly resumed connection idle (NewClient).
func (c *Client) Pause() {
	c.pauseMu.Lock()
	defer c.pauseMu.Unlock()
	c.paused = true
	for _, t := range c.c.Torrents() {
		t.DisallowDataDownload()
		if b := c.lookup(t); b != nil {
			b.refreshPriorities()
		}
	}
}

// Resume lets torrents download again after Pause.
func (c *Client) Resume() {
	c.pauseMu.Lock()
	defer c.pauseMu.Unlock()
	c.paused = false
	for _, t := range c.c.Torrents() {
		t.AllowDataDownload()
	}
}

func (c *Client) lookup(t *torrent.Torrent) *Torrent {
	v, _ := c.torrents.Load(t)
	b, _ := v.(*Torrent)
	return b
}

// Stats are a client's counters.
type Stats struct {
	PeerBytesRead, BytesWritten int64 // useful blob bytes from peers, blob bytes sent to peers
	PiecesGood, PiecesBad       int64 // pieces from peers that passed / failed their check
	PiecesReadBack              int64 // checks that read their piece back (see writehash.go)
	Torrents, Peers             int   // torrents open, peer connections
	// Duplicates and DuplicatesWon count the pieces path's endgame fetches (piecewire); the
	// torrent client reports none.
	Duplicates, DuplicatesWon int64
}

// Stats returns the client's counters.
func (c *Client) Stats() Stats {
	cs := c.c.Stats()
	v := Stats{
		PeerBytesRead: cs.BytesReadUsefulData.Int64(),
		BytesWritten:  cs.BytesWrittenData.Int64(),
		PiecesGood:    cs.PiecesDirtiedGood.Int64(),
		// The client counts no bad piece of a blob: a blob piece's failed check is an error to
		// it (see ban.go), and the adapter counts them.
		PiecesBad:      c.piecesBad.Load(),
		PiecesReadBack: c.readBacks.Load(),
	}
	for _, t := range c.c.Torrents() {
		v.Torrents++
		v.Peers += len(t.PeerConns())
	}
	return v
}

// BlobInfo returns the bencoded info of a blob's torrent: named name, of length bytes in pieces
// of pieceLength, every piece hash a placeholder (the real ones arrive with SetHashes). Every
// node builds the same one, so it needs no exchange.
func BlobInfo(name string, length, pieceLength int64) ([]byte, error) {
	n := (length + pieceLength - 1) / pieceLength
	pieces := make([]byte, 0, n*sha1Size)
	for range n {
		pieces = append(pieces, placeholderHash[:]...)
	}
	return bencode.Marshal(metainfo.Info{Name: name, PieceLength: pieceLength, Pieces: pieces, Length: length})
}

// Info is a segment's torrent info: the hashes of a byte range's pieces.
type Info struct {
	Name        string
	Length      int64
	PieceLength int64
	Pieces      []byte // HashSize bytes per piece
	Files       int    // files listed (a segment's info must have none)
}

// EncodeInfo returns info bencoded, in the canonical form DecodeInfo checks.
func EncodeInfo(info Info) ([]byte, error) {
	return bencode.Marshal(metainfo.Info{Name: info.Name, PieceLength: info.PieceLength, Pieces: info.Pieces, Length: info.Length})
}

// DecodeInfo parses a bencoded info and checks that it is in canonical form (re-encoding gives
// the same bytes: otherwise its infohash would not be what every node computes).
func DecodeInfo(b []byte) (Info, error) {
	var mi metainfo.Info
	if err := bencode.Unmarshal(b, &mi); err != nil {
		return Info{}, fmt.Errorf("decode info: %w", err)
	}
	info := Info{Name: mi.Name, Length: mi.Length, PieceLength: mi.PieceLength, Pieces: mi.Pieces, Files: len(mi.Files)}
	again, err := bencode.Marshal(mi)
	if err != nil || string(again) != string(b) {
		return Info{}, errors.New("info is not in canonical form")
	}
	return info, nil
}
