package torrent

import (
	"context"
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/anacrolix/torrent"
)

// The tests in this package that need a swarm run real clients, each on its own loopback
// address (127.0.0.x) as a node is on its own host: bans and OnData name peers by IP. They
// wait for conditions, never for durations, and assert no durations.

// waitLimit bounds every wait for a condition: far beyond what the tests need on an idle
// machine, so that only a real failure reaches it.
const waitLimit = 30 * time.Second

// waitFor waits until cond holds, and fails the test with what it waited for if it does not
// within waitLimit.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", waitLimit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testNode is a Client on its own loopback address, with what it reported and what tests watch
// through the torrent client's callbacks.
type testNode struct {
	*Client
	addr netip.AddrPort
	reqs *requestWatch
	logs *logRecorder

	mu    sync.Mutex
	heard map[netip.Addr]int // OnData reports by peer
	bans  []netip.Addr       // OnBan reports
}

// testChunkSize is the chunk size of the test clients unless a test sets another.
const testChunkSize = 16 << 10

// newTestNode starts a client on ip (127.0.0.x); opts change its configuration. The client and
// its listener are closed when the test ends.
func newTestNode(t *testing.T, ip string, opts ...func(*Config)) *testNode {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	tcp, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		t.Fatalf("listener address %v is not TCP", l.Addr())
	}
	n := &testNode{addr: tcp.AddrPort(), reqs: &requestWatch{}, logs: &logRecorder{}, heard: map[netip.Addr]int{}}
	cfg := Config{
		Dir:             t.TempDir(),
		Self:            n.addr,
		Listener:        l,
		OnData:          n.onData,
		OnBan:           n.onBan,
		ChunkSize:       testChunkSize,
		RequestsPerConn: 8,
		MaxPeerRequests: 1024,
		ConnsPerTorrent: 8,
		StealGrace:      3 * time.Second,
		DialTimeout:     time.Second,
		Logger:          slog.New(n.logs),
		tune:            n.reqs.install,
	}
	for _, o := range opts {
		o(&cfg)
	}
	c, err := NewClient(cfg)
	if err != nil {
		_ = l.Close()
		t.Fatal(err)
	}
	n.Client = c
	// The torrent client's accept loop ends when its listener fails after the client closed,
	// so the listener closes last.
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close client %v: %v", n.addr, err)
		}
		_ = l.Close()
	})
	return n
}

func (n *testNode) onData(addr netip.Addr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.heard[addr]++
}

func (n *testNode) onBan(addr netip.Addr, _ time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.bans = append(n.bans, addr)
}

// heardFrom returns how many times OnData reported addr.
func (n *testNode) heardFrom(addr netip.Addr) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.heard[addr]
}

// banned returns the peers OnBan reported.
func (n *testNode) banned() []netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.bans)
}

// testBlob is a blob's bytes and its torrent's geometry.
type testBlob struct {
	name        string
	data        []byte
	pieceLength int64
}

// newTestBlob returns size pseudo-random bytes (the same for the same seed) in pieces of
// pieceLength.
func newTestBlob(seed uint64, size int, pieceLength int64) testBlob {
	r := rand.New(rand.NewPCG(seed, seed)) //nolint:gosec // test data, not secrets
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	return testBlob{name: fmt.Sprintf("blob%d", seed), data: data, pieceLength: pieceLength}
}

func (b testBlob) pieces() int { return int((int64(len(b.data)) + b.pieceLength - 1) / b.pieceLength) }

// piece returns the bytes of piece i.
func (b testBlob) piece(i int) []byte {
	return b.data[int64(i)*b.pieceLength : min(int64(i+1)*b.pieceLength, int64(len(b.data)))]
}

// hashes returns the SHA-1 of pieces [from, to), concatenated.
func (b testBlob) hashes(from, to int) []byte {
	var out []byte
	for i := from; i < to; i++ {
		sum := sha1.Sum(b.piece(i)) //nolint:gosec // see import
		out = append(out, sum[:]...)
	}
	return out
}

// testFile returns a File over a new file of size bytes in the test's directory, holding data
// (zeros if data is nil), and the os.File under it.
func testFile(t *testing.T, size int, data []byte) (*File, *os.File) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	if data != nil {
		if _, err := f.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
	}
	file := NewFile(f, f, f)
	t.Cleanup(file.Close)
	return file, f
}

// add adds b to n over file, with the hashes of every piece in state state and every piece
// wanted (a seeder's pieces are complete, so nothing is downloaded).
func (n *testNode) add(t *testing.T, b testBlob, file *File, state CompletionState) *Torrent {
	t.Helper()
	tt, err := n.AddBlob(b.name, int64(len(b.data)), b.pieceLength, file, func(err error) {
		t.Errorf("%v: write error: %v", n.addr, err)
	})
	if err != nil {
		t.Fatal(err)
	}
	tt.SetHashes(0, b.hashes(0, b.pieces()), state)
	tt.SetPriority(0, b.pieces(), PriorityNormal)
	return tt
}

// seed adds b to n, complete.
func (n *testNode) seed(t *testing.T, b testBlob) *Torrent {
	t.Helper()
	file, _ := testFile(t, len(b.data), b.data)
	return n.add(t, b, file, AllComplete)
}

// leech adds b to n, empty and wanted; the returned file is the blob's.
func (n *testNode) leech(t *testing.T, b testBlob) (*Torrent, *os.File) {
	t.Helper()
	file, f := testFile(t, len(b.data), nil)
	return n.add(t, b, file, AllIncomplete), f
}

// waitComplete waits for tt to complete, then checks that f holds want.
func waitComplete(t *testing.T, tt *Torrent, f *os.File, want []byte) {
	t.Helper()
	select {
	case <-tt.Complete():
	case <-time.After(waitLimit):
		t.Fatalf("blob not complete after %v: %d of %d bytes", waitLimit, tt.BytesCompleted(), len(want))
	}
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatal("the complete blob's bytes differ from the seeder's")
	}
}

// requestWatch follows a client's requests through its callbacks: how many each connection has
// outstanding, and that number each time a chunk it asked for arrives.
type requestWatch struct {
	mu          sync.Mutex
	outstanding map[*torrent.Peer]int
	sent        int         // requests sent, in all
	pieces      map[int]int // requests sent, by piece
	pending     map[int]int // requests outstanding, by piece
	atArrival   []int       // a connection's outstanding requests when a chunk it asked for arrived
	maxOut      int         // the most requests a connection had outstanding
}

func (w *requestWatch) install(cc *torrent.ClientConfig) {
	cc.Callbacks.SentRequest = append(cc.Callbacks.SentRequest, func(ev torrent.PeerRequestEvent) {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.outstanding == nil {
			w.outstanding = map[*torrent.Peer]int{}
		}
		if w.pieces == nil {
			w.pieces, w.pending = map[int]int{}, map[int]int{}
		}
		w.pending[int(ev.Index)]++
		w.sent++
		w.pieces[int(ev.Index)]++
		w.outstanding[ev.Peer]++
		w.maxOut = max(w.maxOut, w.outstanding[ev.Peer])
	})
	cc.Callbacks.DeletedRequest = append(cc.Callbacks.DeletedRequest, func(ev torrent.PeerRequestEvent) {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.outstanding[ev.Peer]--
		w.pending[int(ev.Index)]--
	})
	cc.Callbacks.ReceivedRequested = append(cc.Callbacks.ReceivedRequested, func(ev torrent.PeerMessageEvent) {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.atArrival = append(w.atArrival, w.outstanding[ev.Peer])
	})
}

// sentSoFar returns how many requests the client has sent.
func (w *requestWatch) sentSoFar() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.sent
}

// sentFor returns how many requests the client has sent for chunks of piece i.
func (w *requestWatch) sentFor(i int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pieces[i]
}

// mostPending returns the piece with the most requests outstanding, or -1 if none has any.
func (w *requestWatch) mostPending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	piece, most := -1, 0
	for p, n := range w.pending {
		if n > most {
			piece, most = p, n
		}
	}
	return piece
}

// arrivals returns the outstanding requests counted at each arrival, and the most seen.
func (w *requestWatch) arrivals() ([]int, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.atArrival), w.maxOut
}

// logRecorder is a slog.Handler that keeps every record's level and message, and its "err"
// attribute if any.
type logRecorder struct {
	mu      sync.Mutex
	records []loggedRecord
}

type loggedRecord struct {
	level   slog.Level
	message string
	err     any
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	rec := loggedRecord{level: r.Level, message: r.Message}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "err" {
			rec.err = a.Value.Any()
		}
		return true
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records = append(l.records, rec)
	return nil
}

func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

// matching returns the records for which match holds.
func (l *logRecorder) matching(match func(loggedRecord) bool) []loggedRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []loggedRecord
	for _, r := range l.records {
		if match(r) {
			out = append(out, r)
		}
	}
	return out
}
