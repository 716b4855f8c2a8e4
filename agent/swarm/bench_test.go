package swarm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/test/benchcpu"
)

// BenchmarkTwoAgentTransfer: one agent's swarm holds a blob, another reads it through its own
// swarm with the first as the only seeder (the registry down, so every byte comes from the peer) and hashes it as the content
// store does, over loopback. Both swarms run in this process: the CPU reported is both ends'.
// Compare with BenchmarkHTTPCopySHA256, the same bytes over plain HTTP.
//
//	go test -run '^$' -bench 'TwoAgentTransfer|HTTPCopySHA256' -benchtime 3x ./agent/swarm
func BenchmarkTwoAgentTransfer(b *testing.B) {
	size := benchcpu.BlobSize(b)
	content := randomBlob(b, size)
	up := newMemUpstream()
	d := up.add(content)
	up.blobsDown.Store(true)
	// The seeder's content store holds the blob in a file, as a node's does: its uploads can
	// use sendfile.
	held := &fileBlobs{d: d, path: filepath.Join(b.TempDir(), "blob")}
	if err := os.WriteFile(held.path, content, 0o600); err != nil {
		b.Fatal(err)
	}
	var cpu time.Duration
	b.ResetTimer() // not the blob's generation
	for range b.N {
		b.StopTimer()
		locals := []LocalBlobs{held, &heldBlobs{d: d, data: content}}
		nodes := startNodes(b, 2, up, func(i int) LocalBlobs { return locals[i] })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		start := benchcpu.ProcessCPU(b)
		stopProfile := benchcpu.Profile(b)
		b.StartTimer()
		// Node 0 seeds every segment, from its store: node 1 gets every byte from it.
		rc, n, err := nodes[1].swarm.SourceWithin("registry.test", "bench/blob", d, []netip.AddrPort{nodes[0].addr})(ctx)
		if err != nil {
			b.Fatal(err)
		}
		h := sha256.New()
		got, err := io.Copy(h, rc)
		rc.Close()
		b.StopTimer()
		cpu += benchcpu.ProcessCPU(b) - start
		stopProfile()
		cancel()
		if err != nil || got != n || hex.EncodeToString(h.Sum(nil)) != d.Hex {
			b.Fatalf("read %d of %d bytes (%v); digest %x", got, n, err, h.Sum(nil))
		}
	}
	b.SetBytes(int64(size))
	benchcpu.ReportPerGiB(b, cpu, int64(size)*int64(b.N))
}

// fileBlobs is a content store that holds one complete blob in a file.
type fileBlobs struct {
	d    v1.Hash
	path string
}

func (f *fileBlobs) Get(d v1.Hash) (store.Blob, error) {
	if d != f.d {
		return nil, store.ErrNotFound
	}
	file, err := os.Open(f.path)
	if err != nil {
		return nil, err
	}
	st, err := file.Stat()
	if err != nil {
		file.Close()
		return nil, err
	}
	return sizedFile{file, st.Size()}, nil
}

// sizedFile is a file as a store.Blob; it keeps *os.File's SyscallConn, so the swarm can
// reopen it for sendfile.
type sizedFile struct {
	*os.File
	size int64
}

func (f sizedFile) Size() int64 { return f.size }

// BenchmarkHTTPCopySHA256 is the floor BenchmarkTwoAgentTransfer is measured against: the same
// blob served from a file by net/http over loopback, read and hashed by a client; in "file" the
// client also writes it to a new file, as a node must (on a virtual machine whose host takes
// freed memory back, every page a new file fills costs a fault in the host: see benchmarks.md).
func BenchmarkHTTPCopySHA256(b *testing.B) {
	size := benchcpu.BlobSize(b)
	content := randomBlob(b, size)
	sum := sha256.Sum256(content)
	path := filepath.Join(b.TempDir(), "blob")
	if err := os.WriteFile(path, content, 0o644); err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, path)
	})}
	go func() { _ = srv.Serve(l) }()
	b.Cleanup(func() { _ = srv.Close() })
	url := "http://" + l.Addr().String() + "/blob"
	for _, toFile := range []bool{false, true} {
		name := "memory"
		if toFile {
			name = "file"
		}
		b.Run(name, func(b *testing.B) {
			var cpu time.Duration
			for range b.N {
				b.StopTimer()
				var sink io.Writer
				if !toFile {
					sink = io.Discard
				} else {
					f, err := os.Create(filepath.Join(b.TempDir(), "copy"))
					if err != nil {
						b.Fatal(err)
					}
					defer f.Close()
					sink = f
				}
				b.StartTimer()
				start := benchcpu.ProcessCPU(b)
				resp, err := http.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				h := sha256.New()
				got, err := io.Copy(io.MultiWriter(h, sink), resp.Body)
				resp.Body.Close()
				cpu += benchcpu.ProcessCPU(b) - start
				if err != nil || got != int64(size) || [32]byte(h.Sum(nil)) != sum {
					b.Fatalf("read %d of %d bytes (%v)", got, size, err)
				}
			}
			b.SetBytes(int64(size))
			benchcpu.ReportPerGiB(b, cpu, int64(size)*int64(b.N))
		})
	}
}
