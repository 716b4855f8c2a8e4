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
	"runtime/pprof"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// benchBlobSize is the blob the transfer benchmarks move: SHOAL_BENCH_BLOB_MIB MiB, default 256
// (the figure is for 1024: SHOAL_BENCH_BLOB_MIB=1024).
func benchBlobSize(b *testing.B) int {
	mib := 256
	if v := os.Getenv("SHOAL_BENCH_BLOB_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("SHOAL_BENCH_BLOB_MIB=%q: want a positive number", v)
		}
		mib = n
	}
	return mib << 20
}

// processCPU is the CPU time this process has used, user and system.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU both ends spent per GiB moved, the figure the swarm's cost is
// judged by (a copy plus sha256 costs about 1-1.5 CPU-s per GiB here).
func reportCPU(b *testing.B, cpu time.Duration, bytes int64) {
	b.ReportMetric(cpu.Seconds()/(float64(bytes)/(1<<30)), "cpu-s/GiB")
}

// BenchmarkTwoAgentTransfer: one agent's swarm holds a blob, another reads it through its own
// swarm with the first as the only seeder (the registry down, so every byte comes from the peer) and hashes it as the content
// store does, over loopback. Both swarms run in this process: the CPU reported is both ends'.
// Compare with BenchmarkHTTPCopySHA256, the same bytes over plain HTTP.
//
//	go test -run '^$' -bench 'TwoAgentTransfer|HTTPCopySHA256' -benchtime 3x ./agent/swarm
func BenchmarkTwoAgentTransfer(b *testing.B) {
	size := benchBlobSize(b)
	content := randomBlob(b, size)
	up := newMemUpstream()
	d := up.add(content)
	up.blobsDown.Store(true)
	var cpu time.Duration
	b.ResetTimer() // not the blob's generation
	for range b.N {
		b.StopTimer()
		locals := []*heldBlobs{{d: d, data: content}, {d: d, data: content}}
		locals[0].held.Store(true)
		nodes := startNodes(b, 2, up, func(i int) LocalBlobs { return locals[i] })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		start := processCPU(b)
		stopProfile := profileTransfer(b)
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
		cpu += processCPU(b) - start
		stopProfile()
		cancel()
		if err != nil || got != n || hex.EncodeToString(h.Sum(nil)) != d.Hex {
			b.Fatalf("read %d of %d bytes (%v); digest %x", got, n, err, h.Sum(nil))
		}
	}
	b.SetBytes(int64(size))
	reportCPU(b, cpu, int64(size)*int64(b.N))
}

// profileTransfer writes a CPU profile of the transfer alone (not the setup, which generates and
// hashes the blob) to $SHOAL_BENCH_CPUPROFILE when it is set, and returns what stops it.
func profileTransfer(b *testing.B) func() {
	path := os.Getenv("SHOAL_BENCH_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// BenchmarkHTTPCopySHA256 is the floor BenchmarkTwoAgentTransfer is measured against: the same
// blob served from a file by net/http over loopback, read and hashed by a client; in "file" the
// client also writes it to a new file, as a node must (on a virtual machine whose host takes
// freed memory back, every page a new file fills costs a fault in the host: see benchmarks.md).
func BenchmarkHTTPCopySHA256(b *testing.B) {
	size := benchBlobSize(b)
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
				start := processCPU(b)
				resp, err := http.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				h := sha256.New()
				got, err := io.Copy(io.MultiWriter(h, sink), resp.Body)
				resp.Body.Close()
				cpu += processCPU(b) - start
				if err != nil || got != int64(size) || [32]byte(h.Sum(nil)) != sum {
					b.Fatalf("read %d of %d bytes (%v)", got, size, err)
				}
			}
			b.SetBytes(int64(size))
			reportCPU(b, cpu, int64(size)*int64(b.N))
		})
	}
}
