package piecewire

import (
	"bytes"
	"context"
	"crypto/sha1" //nolint:gosec // piece hashes
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

const waitLimit = 60 * time.Second

// testNode is a Node served on its own loopback address, making its requests from it.
type testNode struct {
	*Node
	addr netip.AddrPort

	mu  sync.Mutex
	bad []netip.Addr
}

func newTestNode(t testing.TB, ip string, configure ...func(*Config)) *testNode {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	tn := &testNode{addr: netip.MustParseAddrPort(l.Addr().String())}
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 2 * time.Second}
	cfg := Config{
		Client: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext, MaxIdleConnsPerHost: 16}},
		OnBadPiece: func(a netip.Addr) {
			tn.mu.Lock()
			tn.bad = append(tn.bad, a)
			tn.mu.Unlock()
		},
	}
	for _, c := range configure {
		c(&cfg)
	}
	tn.Node = NewNode(cfg)
	srv := &http.Server{Handler: tn.Node, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() {
		tn.Close()
		_ = srv.Close()
	})
	return tn
}

func (n *testNode) badPeers() []netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]netip.Addr(nil), n.bad...)
}

type testBlob struct {
	name        string
	data        []byte
	pieceLength int64
}

func newTestBlob(seed uint64, size int, pieceLength int64) testBlob {
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	sum := sha256.Sum256(data)
	return testBlob{name: hex.EncodeToString(sum[:]), data: data, pieceLength: pieceLength}
}

func (b testBlob) pieces() int { return int((int64(len(b.data)) + b.pieceLength - 1) / b.pieceLength) }

func (b testBlob) hashes() []byte {
	var out []byte
	for i := range b.pieces() {
		end := min(int64(i+1)*b.pieceLength, int64(len(b.data)))
		sum := sha1.Sum(b.data[int64(i)*b.pieceLength : end]) //nolint:gosec // piece hashes
		out = append(out, sum[:]...)
	}
	return out
}

// file returns a new file of the blob's size holding content (nil: zeros).
func (b testBlob) file(t testing.TB, content []byte) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(len(b.data))); err != nil {
		t.Fatal(err)
	}
	if content != nil {
		if _, err := f.WriteAt(content, 0); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// addFile adds b to n over f, its data and writer.
func (n *testNode) addFile(t testing.TB, b testBlob, f *os.File) *Blob {
	t.Helper()
	bl, err := n.AddBlob(b.name, int64(len(b.data)), b.pieceLength, f, f)
	if err != nil {
		t.Fatal(err)
	}
	return bl
}

// reopenable is a file served with sendfile (a Reopener), as the swarm's blob files are.
type reopenable struct{ *os.File }

func (f reopenable) Reopen() (*os.File, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var file *os.File
	var openErr error
	if err := raw.Control(func(fd uintptr) { file, openErr = os.Open(fmt.Sprintf("/proc/self/fd/%d", fd)) }); err != nil {
		return nil, err
	}
	return file, openErr
}

// hold adds b to n, complete, from a file holding content, served with sendfile.
func (n *testNode) hold(t testing.TB, b testBlob, content []byte) *Blob {
	t.Helper()
	f := b.file(t, content)
	bl, err := n.AddBlob(b.name, int64(len(b.data)), b.pieceLength, reopenable{f}, f)
	if err != nil {
		t.Fatal(err)
	}
	if err := bl.SetHashes(0, b.hashes(), AllComplete); err != nil {
		t.Fatal(err)
	}
	return bl
}

// want adds b to n, empty, every piece wanted with priority prio; it returns the blob's file.
func (n *testNode) want(t testing.TB, b testBlob, prio Priority) (*Blob, *os.File) {
	t.Helper()
	f := b.file(t, nil)
	bl, err := n.AddBlob(b.name, int64(len(b.data)), b.pieceLength, f, f)
	if err != nil {
		t.Fatal(err)
	}
	if err := bl.SetHashes(0, b.hashes(), AllIncomplete); err != nil {
		t.Fatal(err)
	}
	bl.SetPriority(0, b.pieces(), prio)
	return bl, f
}

func waitComplete(t testing.TB, bl *Blob, f *os.File, want []byte) {
	t.Helper()
	select {
	case <-bl.Complete():
	case <-time.After(waitLimit):
		t.Fatalf("blob not complete after %v: %d of %d bytes", waitLimit, bl.BytesCompleted(), len(want))
	}
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the complete blob's bytes differ from the holder's")
	}
}

// TestPiecesComeFromTheirHolders: two peers each hold half of a blob; a node that wants all of
// it gets every piece from whichever has it, verified, and the peers' counters add up.
func TestPiecesComeFromTheirHolders(t *testing.T) {
	a, c, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3"), newTestNode(t, "127.0.0.4")
	blob := newTestBlob(1, 5<<20+12345, 256<<10)
	half := blob.pieces() / 2
	for _, h := range []struct {
		n        *testNode
		from, to int
	}{{a, 0, half}, {c, half, blob.pieces()}} {
		bl := h.n.addFile(t, blob, blob.file(t, blob.data))
		hashes := blob.hashes()
		if err := bl.SetHashes(h.from, hashes[h.from*HashSize:h.to*HashSize], AllComplete); err != nil {
			t.Fatal(err)
		}
	}
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{a.addr, c.addr})
	waitComplete(t, bl, f, blob.data)
	sa, sc, sn := a.Stats(), c.Stats(), node.Stats()
	if sn.BytesFromPeers != int64(len(blob.data)) || sa.BytesToPeers+sc.BytesToPeers != int64(len(blob.data)) {
		t.Errorf("node got %d bytes from peers, the holders sent %d + %d; want %d each way", sn.BytesFromPeers, sa.BytesToPeers, sc.BytesToPeers, len(blob.data))
	}
	if sa.BytesToPeers == 0 || sc.BytesToPeers == 0 {
		t.Errorf("holders sent %d and %d bytes; want both to have sent their half", sa.BytesToPeers, sc.BytesToPeers)
	}
}

// TestUnverifiedPiecesAreNotServed: a piece is served only once verified here; a request for one
// that is not, for a blob not here, or a malformed one, is refused with the reason.
func TestUnverifiedPiecesAreNotServed(t *testing.T) {
	node := newTestNode(t, "127.0.0.2")
	blob := newTestBlob(2, 1<<20, 256<<10)
	bl := node.addFile(t, blob, blob.file(t, blob.data))
	hashes := blob.hashes()
	if err := bl.SetHashes(0, hashes, AllIncomplete); err != nil {
		t.Fatal(err)
	}
	if err := bl.SetHashes(1, hashes[HashSize:2*HashSize], AllComplete); err != nil {
		t.Fatal(err)
	}
	other := newTestBlob(3, 1<<20, 256<<10)
	for _, c := range []struct {
		query string
		code  int
	}{
		{fmt.Sprintf("blob=%s&index=1", blob.name), http.StatusOK},
		{fmt.Sprintf("blob=%s&index=0", blob.name), http.StatusNotFound},
		{fmt.Sprintf("blob=%s&index=0", other.name), http.StatusNotFound},
		{fmt.Sprintf("blob=%s&index=4", blob.name), http.StatusBadRequest},
		{fmt.Sprintf("blob=%s&index=-1", blob.name), http.StatusBadRequest},
		{fmt.Sprintf("blob=%s&index=x", blob.name), http.StatusBadRequest},
		{"blob=../../etc/passwd&index=0", http.StatusBadRequest},
		{"blob=" + blob.name[:63] + "A&index=0", http.StatusBadRequest},
	} {
		resp, err := http.Get(fmt.Sprintf("http://%s%s?%s", node.addr, PiecePath, c.query))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.code {
			t.Errorf("%s: %s (%q), want %d", c.query, resp.Status, body, c.code)
		}
		if c.code == http.StatusOK && !bytes.Equal(body, blob.data[blob.pieceLength:2*blob.pieceLength]) {
			t.Errorf("%s: %d bytes that are not piece 1", c.query, len(body))
		}
	}
}

// TestCorruptPieceIsReportedAndFetchedElsewhere: one of two holders serves a piece whose bytes
// are corrupt on its disk. The node reports that holder (its sole sender) and gets the piece
// from the other; nothing corrupt is ever counted complete.
func TestCorruptPieceIsReportedAndFetchedElsewhere(t *testing.T) {
	liar, honest, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3"), newTestNode(t, "127.0.0.4")
	blob := newTestBlob(4, 2<<20, 256<<10)
	corrupt := bytes.Clone(blob.data)
	for i := range blob.pieces() {
		corrupt[int64(i)*blob.pieceLength+100] ^= 0xff // every piece the liar has is bad
	}
	liar.hold(t, blob, corrupt)
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{liar.addr})
	deadline := time.Now().Add(waitLimit)
	for len(node.badPeers()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := bl.BytesCompleted(); got != 0 {
		t.Fatalf("%d bytes complete from a peer whose every piece is corrupt", got)
	}
	honest.hold(t, blob, blob.data)
	bl.AddPeers([]netip.AddrPort{honest.addr})
	waitComplete(t, bl, f, blob.data)
	for _, a := range node.badPeers() {
		if a != liar.addr.Addr() {
			t.Errorf("reported %v, which sent good pieces only", a)
		}
	}
	if node.Stats().PiecesBad == 0 {
		t.Error("no bad piece counted")
	}
}

// TestFrozenPiecesAreLeftAlone: pieces frozen (their bytes come from elsewhere) are neither
// fetched nor written, and the rest completes around them.
func TestFrozenPiecesAreLeftAlone(t *testing.T) {
	holder, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(5, 2<<20, 256<<10)
	holder.hold(t, blob, blob.data)
	bl, f := node.want(t, blob, PriorityNormal)
	bl.Freeze(2, 4)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	want := int64(len(blob.data)) - 2*blob.pieceLength
	deadline := time.Now().Add(waitLimit)
	for bl.BytesCompleted() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if got := bl.BytesCompleted(); got != want {
		t.Fatalf("%d bytes complete, want %d: all but the two frozen pieces", got, want)
	}
	got := make([]byte, 2*blob.pieceLength)
	if _, err := f.ReadAt(got, 2*blob.pieceLength); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Error("bytes were written into frozen pieces")
	}
}

// TestStalledPeerIsLeft: a peer that answers a piece request and then sends nothing loses the
// piece after the stall timeout, and the node gets it from another peer.
func TestStalledPeerIsLeft(t *testing.T) {
	blob := newTestBlob(6, 1<<20, 256<<10)
	honest := newTestNode(t, "127.0.0.2")
	honest.hold(t, blob, blob.data)
	// The staller announces every piece and sends half of any piece asked, then nothing.
	staller := newTestNode(t, "127.0.0.3")
	staller.hold(t, blob, blob.data)
	l, err := net.Listen("tcp", "127.0.0.4:0")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	defer close(release)
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == HavesPath {
			staller.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(blob.pieceLength))
		_, _ = w.Write(make([]byte, blob.pieceLength/2))
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()
	stallAddr := netip.MustParseAddrPort(l.Addr().String())

	node := newTestNode(t, "127.0.0.5", func(c *Config) { c.StallTimeout = 300 * time.Millisecond })
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{stallAddr})
	time.Sleep(time.Second) // the staller holds pieces, and the node waits past the stall timeout
	if got := bl.BytesCompleted(); got != 0 {
		t.Fatalf("%d bytes complete from a peer that sends half a piece", got)
	}
	bl.AddPeers([]netip.AddrPort{honest.addr})
	waitComplete(t, bl, f, blob.data)
}

// TestHighPriorityPiecesComeFirstInOrder: from a peer whose uploads are slow, the node fetches
// the pieces of high priority before any other, in the blob's order.
func TestHighPriorityPiecesComeFirstInOrder(t *testing.T) {
	blob := newTestBlob(7, 4<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 8 << 20 })
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.FetchesPerPeer = 1 })
	bl, f := node.want(t, blob, PriorityNormal)
	high := []int{9, 10, 11, 12}
	bl.SetPriority(high[0], high[len(high)-1]+1, PriorityHigh)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	waitComplete(t, bl, f, blob.data)
	bl.mu.Lock()
	order := append([]uint32(nil), bl.log...)
	bl.mu.Unlock()
	for k, i := range high {
		if int(order[k]) != i {
			t.Fatalf("pieces completed in the order %v; want %v first", order, high)
		}
	}
}

// TestHavesFollowCompletions: a node following a peer learns of each piece the peer verifies
// after the stream opened, not only of those in its bitfield.
func TestHavesFollowCompletions(t *testing.T) {
	blob := newTestBlob(8, 1<<20, 256<<10)
	peerNode, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	pb := peerNode.addFile(t, blob, blob.file(t, blob.data))
	hashes := blob.hashes()
	if err := pb.SetHashes(0, hashes[:HashSize], AllComplete); err != nil {
		t.Fatal(err)
	}
	bl, _ := node.want(t, blob, PriorityNone) // follows, fetches nothing
	bl.AddPeers([]netip.AddrPort{peerNode.addr})
	waitHolders := func(i, want int) {
		t.Helper()
		deadline := time.Now().Add(waitLimit)
		for bl.Holders(i, nil) != want && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := bl.Holders(i, nil); got != want {
			t.Fatalf("piece %d: %d holders known, want %d", i, got, want)
		}
	}
	waitHolders(0, 1)
	waitHolders(3, 0)
	if err := pb.SetHashes(3, hashes[3*HashSize:], AllComplete); err != nil {
		t.Fatal(err)
	}
	waitHolders(3, 1)
	if bl.Holders(1, nil) != 0 {
		t.Error("piece 1, which the peer never verified, is known as held")
	}
}

// TestRefusedPeersAreNeitherServedNorAsked: a node serves nothing to a refused peer and fetches
// nothing from one.
func TestRefusedPeersAreNeitherServedNorAsked(t *testing.T) {
	blob := newTestBlob(9, 1<<20, 256<<10)
	var refuse sync.Map
	holder := newTestNode(t, "127.0.0.2", func(c *Config) {
		c.Refused = func(a netip.Addr) bool { _, ok := refuse.Load(a); return ok }
	})
	holder.hold(t, blob, blob.data)
	refuse.Store(netip.MustParseAddr("127.0.0.3"), true)
	node := newTestNode(t, "127.0.0.3")
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	time.Sleep(500 * time.Millisecond)
	if got := bl.BytesCompleted(); got != 0 || holder.Stats().BytesToPeers != 0 {
		t.Fatalf("a refused node got %d bytes", got)
	}
	refuse.Delete(netip.MustParseAddr("127.0.0.3"))
	waitComplete(t, bl, f, blob.data)
}

// TestPauseStopsFetchesUntilResume: a paused node starts no fetch (those under way finish), and
// completes once resumed.
func TestPauseStopsFetchesUntilResume(t *testing.T) {
	blob := newTestBlob(10, 4<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 4 << 20 })
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3")
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	deadline := time.Now().Add(waitLimit)
	for bl.BytesCompleted() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	node.Pause()
	time.Sleep(300 * time.Millisecond) // the fetches under way, two pieces at most, end
	paused := bl.BytesCompleted()
	sent := holder.Stats().BytesToPeers
	time.Sleep(500 * time.Millisecond)
	if got := bl.BytesCompleted(); got != paused || paused == int64(len(blob.data)) {
		t.Fatalf("%d bytes complete after the pause, %d half a second later (of %d); want no change short of the whole blob", paused, got, len(blob.data))
	}
	if more := holder.Stats().BytesToPeers - sent; more != 0 {
		t.Errorf("the holder sent %d more bytes while the node was paused", more)
	}
	node.Resume()
	waitComplete(t, bl, f, blob.data)
}

// TestResumedDownloadKeepsItsGoodPieces: a blob whose file already holds some pieces (an
// interrupted download) has them checked against their hashes: the good ones count as complete
// and only the others are fetched.
func TestResumedDownloadKeepsItsGoodPieces(t *testing.T) {
	blob := newTestBlob(11, 2<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2")
	holder.hold(t, blob, blob.data)
	partial := make([]byte, len(blob.data))
	copy(partial, blob.data[:4*blob.pieceLength]) // pieces 0-3 written, 4-7 not
	partial[100] ^= 1                             // piece 0 damaged
	node := newTestNode(t, "127.0.0.3")
	f := blob.file(t, partial)
	bl := node.addFile(t, blob, f)
	if err := bl.SetHashes(0, blob.hashes(), UnknownCompletion); err != nil {
		t.Fatal(err)
	}
	bl.SetPriority(0, blob.pieces(), PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	waitComplete(t, bl, f, blob.data)
	if got, want := node.Stats().BytesFromPeers, 5*blob.pieceLength; got != want {
		t.Errorf("fetched %d bytes from peers; want %d: the damaged piece and the four missing ones", got, want)
	}
}

// TestReaderPiecesComeFirst: a reader's next pieces are fetched before any other, even before
// pieces of high priority, and it reads the blob's bytes.
func TestReaderPiecesComeFirst(t *testing.T) {
	blob := newTestBlob(12, 4<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 8 << 20 })
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.FetchesPerPeer = 1 })
	bl, _ := node.want(t, blob, PriorityNormal)
	bl.SetPriority(0, 4, PriorityHigh)
	r := bl.NewReader(blob.pieceLength)
	defer r.Close()
	if _, err := r.Seek(10*blob.pieceLength, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	bl.AddPeers([]netip.AddrPort{holder.addr})
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	got := make([]byte, 2*blob.pieceLength)
	for n := 0; n < len(got); {
		m, err := r.ReadContext(ctx, got[n:])
		if err != nil {
			t.Fatal(err)
		}
		n += m
	}
	if !bytes.Equal(got, blob.data[10*blob.pieceLength:12*blob.pieceLength]) {
		t.Fatal("the reader read other bytes than the blob's")
	}
	bl.mu.Lock()
	order := append([]uint32(nil), bl.log...)
	bl.mu.Unlock()
	if len(order) < 2 || order[0] != 10 || order[1] != 11 {
		t.Errorf("pieces completed in the order %v; want the reader's 10 and 11 first", order)
	}
}

// TestCloseRefusedDropsPeers: a peer refused after it was given is no longer followed nor
// fetched from.
func TestCloseRefusedDropsPeers(t *testing.T) {
	blob := newTestBlob(13, 4<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 1 << 20 })
	holder.hold(t, blob, blob.data)
	var refused sync.Map
	node := newTestNode(t, "127.0.0.3", func(c *Config) {
		c.Refused = func(a netip.Addr) bool { _, ok := refused.Load(a); return ok }
	})
	bl, _ := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	deadline := time.Now().Add(waitLimit)
	for bl.Holders(0, nil) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	refused.Store(holder.addr.Addr(), true)
	node.CloseRefused()
	if st := bl.Stats(); st.Peers != 0 || bl.Holders(0, nil) != 0 {
		t.Fatalf("after CloseRefused: %+v, piece 0 held by %d; want no peer", st, bl.Holders(0, nil))
	}
	time.Sleep(200 * time.Millisecond)
	done := bl.BytesCompleted()
	time.Sleep(1500 * time.Millisecond)
	if got := bl.BytesCompleted(); got != done {
		t.Errorf("%d bytes complete after the peer was refused, %d later", done, got)
	}
}

// fullDisk fails every write as a full disk does.
type fullDisk struct{}

func (fullDisk) WriteAt([]byte, int64) (int, error) {
	return 0, &fs.PathError{Op: "write", Path: "blob", Err: syscall.ENOSPC}
}

// TestFullDiskDropsTheBlob: a write that the disk fails is reported once, and the blob is
// dropped: nothing more is fetched into it.
func TestFullDiskDropsTheBlob(t *testing.T) {
	blob := newTestBlob(14, 2<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2")
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3")
	bl, err := node.AddBlob(blob.name, int64(len(blob.data)), blob.pieceLength, blob.file(t, nil), fullDisk{})
	if err != nil {
		t.Fatal(err)
	}
	reported := make(chan error, 4)
	bl.OnWriteError(func(err error) { reported <- err })
	if err := bl.SetHashes(0, blob.hashes(), AllIncomplete); err != nil {
		t.Fatal(err)
	}
	bl.SetPriority(0, blob.pieces(), PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	select {
	case err := <-reported:
		if !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("reported %v, want the disk's ENOSPC", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("a failed write was never reported")
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := bl.WaitPiece(ctx, 0); err == nil || ctx.Err() != nil {
		t.Fatalf("waiting for a piece of the blob: %v; want it to end as the blob is dropped", err)
	}
	time.Sleep(100 * time.Millisecond) // what was in flight at the drop winds down
	sent := holder.Stats().BytesToPeers
	time.Sleep(300 * time.Millisecond)
	if more := holder.Stats().BytesToPeers - sent; more != 0 || len(reported) != 0 {
		t.Errorf("after the blob was dropped the holder sent %d more bytes, and %d more errors were reported", more, len(reported))
	}
}

// TestBusyPeerSendsFetchersElsewhere: a holder that serves one piece at a time answers the other
// requests "busy"; the nodes asking come back or go to another holder, and all complete.
func TestBusyPeerSendsFetchersElsewhere(t *testing.T) {
	blob := newTestBlob(15, 2<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploads = 1; c.MaxUploadRate = 8 << 20 })
	holder.hold(t, blob, blob.data)
	a, c := newTestNode(t, "127.0.0.3"), newTestNode(t, "127.0.0.4")
	ba, fa := a.want(t, blob, PriorityNormal)
	bc, fc := c.want(t, blob, PriorityNormal)
	ba.AddPeers([]netip.AddrPort{holder.addr})
	bc.AddPeers([]netip.AddrPort{holder.addr, a.addr})
	waitComplete(t, ba, fa, blob.data)
	waitComplete(t, bc, fc, blob.data)
	if holder.Stats().UploadsRefused == 0 {
		t.Error("no request was refused by a holder that serves one at a time to four fetchers")
	}
}

// TestDownloadRateCapsFetches: a node whose downloads are capped receives no faster than the
// cap (plus one read's allowance) from a peer that would send at loopback speed, and still
// completes the blob.
func TestDownloadRateCapsFetches(t *testing.T) {
	const capRate = 1 << 20
	blob := newTestBlob(40, 3<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2")
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.MaxDownloadRate = capRate })
	bl, f := node.want(t, blob, PriorityNormal)
	start := time.Now()
	bl.AddPeers([]netip.AddrPort{holder.addr})
	time.Sleep(time.Second)
	got, elapsed := bl.BytesCompleted(), time.Since(start)
	// A piece completes only once all its bytes were read, each read after its share of the
	// cap: what completed is at most the cap's bytes over the elapsed time, and the burst.
	if most := int64(elapsed.Seconds()*capRate) + downloadSlice; got > most {
		t.Fatalf("%d bytes completed %v after the start, want at most %d at %d bytes/s", got, elapsed, most, capRate)
	}
	waitComplete(t, bl, f, blob.data)
}

// TestDownloadCapIsNoStall: a cap so low that a fetch waits for it longer than the stall
// timeout between two reads does not make the fetch count as stalled (abandoned and started
// again, it would never complete).
func TestDownloadCapIsNoStall(t *testing.T) {
	blob := newTestBlob(41, 1<<20, 256<<10)
	holder := newTestNode(t, "127.0.0.2")
	holder.hold(t, blob, blob.data)
	node := newTestNode(t, "127.0.0.3", func(c *Config) {
		c.MaxDownloadRate = 4 * downloadSlice // a read every 250 ms
		c.StallTimeout = 100 * time.Millisecond
		c.MaxFetches = 1
	})
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	waitComplete(t, bl, f, blob.data)
}

// waitPartial waits until pieces of bl are being fetched, n of them.
func waitPartial(t *testing.T, bl *Blob, n int) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		partial := 0
		for i := range bl.Pieces() {
			if bl.PiecePartial(i) {
				partial++
			}
		}
		if partial == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pieces being fetched, want %d", partial, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// endgame starts a node (with a long stall timeout) that wants blob and follows slow, a peer
// whose uploads are capped: the cap's burst sends one piece at once and the next two crawl. Once
// two pieces are being fetched from slow, the node follows other too.
func endgame(t *testing.T, blob testBlob, slow, other *testNode) (*testNode, *Blob, *os.File) {
	t.Helper()
	node := newTestNode(t, "127.0.0.4", func(c *Config) { c.StallTimeout = time.Minute })
	bl, f := node.want(t, blob, PriorityNormal)
	bl.AddPeers([]netip.AddrPort{slow.addr})
	waitPartial(t, bl, 2)
	bl.AddPeers([]netip.AddrPort{other.addr})
	return node, bl, f
}

// TestEndgameTakesTheLastPiecesFromAFasterPeer: a node fetches two pieces from a peer that
// uploads at 16 KiB/s (16 s a piece) when a fast peer comes; once every piece it wants is
// complete or being fetched, it fetches the slow peer's pieces from the fast one too and
// completes without waiting for them (the slow fetches do not stall: its stall timeout is long).
func TestEndgameTakesTheLastPiecesFromAFasterPeer(t *testing.T) {
	blob := newTestBlob(42, 4*(256<<10), 256<<10)
	slow := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 16 << 10 })
	slow.hold(t, blob, blob.data)
	fast := newTestNode(t, "127.0.0.3")
	fast.hold(t, blob, blob.data)
	node, bl, f := endgame(t, blob, slow, fast)
	waitComplete(t, bl, f, blob.data)
	sentBySlow := slow.Stats().BytesToPeers
	if st := node.Stats(); st.DuplicatesWon == 0 {
		t.Errorf("no second fetch completed a piece (%d started)", st.Duplicates)
	}
	if sentBySlow >= 3*blob.pieceLength {
		t.Errorf("the slow peer had sent %d bytes when the blob completed: the node waited for its pieces", sentBySlow)
	}
}

// TestEndgameCopyFromALiarNeverReachesTheFile: in the endgame the second fetch of a piece comes
// from a peer that sends wrong bytes: it fails its hash, the liar is reported, and the piece
// completes from the honest (slow) peer with the right bytes.
func TestEndgameCopyFromALiarNeverReachesTheFile(t *testing.T) {
	blob := newTestBlob(43, 3*(256<<10), 256<<10)
	slow := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 256 << 10 })
	slow.hold(t, blob, blob.data)
	corrupt := bytes.Clone(blob.data)
	for i := range corrupt {
		corrupt[i] ^= 0x5a
	}
	liar := newTestNode(t, "127.0.0.3")
	liar.hold(t, blob, corrupt)
	node, bl, f := endgame(t, blob, slow, liar)
	waitComplete(t, bl, f, blob.data)
	node.mu.Lock()
	bad := slices.Contains(node.bad, liar.addr.Addr())
	node.mu.Unlock()
	if st := node.Stats(); st.Duplicates == 0 || !bad {
		t.Errorf("%d second fetches, liar reported %v: want both", st.Duplicates, bad)
	}
}

// TestHorizonHoldsBackThePiecesBeyondIt: with the horizon at h, a node fetches the pieces before
// it and none of those from h on, though its peer has them all; moving the horizon past the last
// piece fetches the rest.
func TestHorizonHoldsBackThePiecesBeyondIt(t *testing.T) {
	holder, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(6, 4<<20, 256<<10)
	const horizon = 5
	holder.hold(t, blob, blob.data)
	bl, f := node.want(t, blob, PriorityNormal)
	bl.SetHorizon(horizon)
	bl.AddPeers([]netip.AddrPort{holder.addr})
	want := horizon * blob.pieceLength
	deadline := time.Now().Add(waitLimit)
	for bl.BytesCompleted() < want && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	for i := range blob.pieces() {
		if before := i < horizon; bl.PieceComplete(i) != before || (!before && bl.PiecePartial(i)) {
			t.Errorf("piece %d: complete %v, being fetched %v; want complete only before the horizon (%d)",
				i, bl.PieceComplete(i), bl.PiecePartial(i), horizon)
		}
	}
	bl.SetHorizon(blob.pieces())
	waitComplete(t, bl, f, blob.data)
}
