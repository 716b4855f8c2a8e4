package swarm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
)

// memUpstream is an in-memory registry that serves byte ranges and counts what it sends.
type memUpstream struct {
	mu        sync.Mutex
	blobs     map[string][]byte
	sent      atomic.Int64
	rangeGets atomic.Int64
	down      atomic.Bool
}

func newMemUpstream() *memUpstream { return &memUpstream{blobs: map[string][]byte{}} }

func (u *memUpstream) add(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
	u.mu.Lock()
	u.blobs[d.Hex] = b
	u.mu.Unlock()
	return d
}

func (u *memUpstream) get(d v1.Hash) ([]byte, error) {
	if u.down.Load() {
		return nil, errors.New("upstream down")
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	b, ok := u.blobs[d.Hex]
	if !ok {
		return nil, fmt.Errorf("blob %s not found", d)
	}
	return b, nil
}

func (u *memUpstream) HeadBlob(_ context.Context, _, _ string, d v1.Hash) (int64, error) {
	b, err := u.get(d)
	return int64(len(b)), err
}

func (u *memUpstream) Blob(_ context.Context, _, _ string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error) {
	b, err := u.get(d)
	if err != nil {
		return nil, 0, err
	}
	if length < 0 {
		length = int64(len(b)) - offset
	}
	u.rangeGets.Add(1)
	u.sent.Add(length)
	return io.NopCloser(bytes.NewReader(b[offset : offset+length])), int64(len(b)), nil
}

// testNode is one agent's swarm on 127.0.0.1.
type testNode struct {
	swarm   *Swarm
	members *Static
	server  *http.Server
	addr    netip.AddrPort
}

func startNodes(t *testing.T, n int, up Upstream) []*testNode {
	t.Helper()
	var listeners []net.Listener
	var addrs []netip.AddrPort
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		listeners = append(listeners, l)
		addrs = append(addrs, netip.MustParseAddrPort(l.Addr().String()))
	}
	var nodes []*testNode
	for i, l := range listeners {
		ctx, cancel := context.WithCancel(context.Background())
		members := NewStatic(addrs[i], addrs, WithProbeInterval(200*time.Millisecond))
		go members.Run(ctx)
		bt, control := Split(l, members.Allowed)
		sw, err := New(Config{
			Dir:          t.TempDir(),
			Membership:   members,
			PeerListener: bt,
			Upstream:     up,
			SegmentSize:  1 << 20,
			PieceLength:  256 << 10,
			StallTimeout: 5 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		server := &http.Server{Handler: sw.Handler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = server.Serve(control) }()
		node := &testNode{swarm: sw, members: members, server: server, addr: addrs[i]}
		t.Cleanup(func() {
			cancel()
			_ = server.Close()
			_ = bt.Close()
			_ = sw.Close()
		})
		nodes = append(nodes, node)
	}
	return nodes
}

func readSource(ctx context.Context, src store.Source) ([]byte, error) {
	rc, size, err := src(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err == nil && int64(len(b)) != size {
		err = fmt.Errorf("read %d bytes, size said %d", len(b), size)
	}
	return b, err
}

func randomBlob(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestConcurrentColdFetchCostsOneUpstreamCopy has every node ask for the same new blob at once
// and checks that each gets the right bytes while upstream sends about one copy.
func TestConcurrentColdFetchCostsOneUpstreamCopy(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20+12345)
	d := up.add(content)
	nodes := startNodes(t, 4, up)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, len(nodes))
	for i, node := range nodes {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
			if err != nil {
				errs <- fmt.Errorf("node %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, content) {
				errs <- fmt.Errorf("node %d: wrong bytes", i)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if sent := up.sent.Load(); sent != int64(len(content)) {
		t.Errorf("upstream sent %d bytes for a %d byte blob fetched by %d nodes, want exactly one copy", sent, len(content), len(nodes))
	}
	var fromPeers int64
	for _, node := range nodes {
		fromPeers += node.swarm.stats().peerBytesRead
	}
	if fromPeers < int64(len(content)) {
		t.Errorf("peers delivered %d bytes in total, want at least one blob's worth (%d)", fromPeers, len(content))
	}
}

// TestDeadSeederFallsBack stops one node before anyone asks: the segments it would seed move to
// the next member and everyone still gets the blob.
func TestDeadSeederFallsBack(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 6<<20)
	d := up.add(content)
	nodes := startNodes(t, 3, up)
	dead := nodes[2]
	_ = dead.server.Close()
	_ = dead.swarm.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i, node := range nodes[:2] {
		got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("node %d: %v (equal %v)", i, err, bytes.Equal(got, content))
		}
	}
}

// TestUpstreamDownFailsFast checks that a blob nobody has, with upstream down, fails at once.
func TestUpstreamDownFailsFast(t *testing.T) {
	up := newMemUpstream()
	d := up.add(randomBlob(t, 1<<20))
	up.down.Store(true)
	nodes := startNodes(t, 2, up)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d)); err == nil {
		t.Fatal("fetch succeeded with upstream down")
	}
}
