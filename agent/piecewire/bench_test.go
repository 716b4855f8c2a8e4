package piecewire

import (
	"crypto/sha1" //nolint:gosec // piece hashes
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/test/benchcpu"
)

// BenchmarkTwoNodeTransfer: one node holds a blob and hashes its pieces (as a seeder builds the
// segments' infos), another fetches every piece of it from the first over loopback and then
// hashes it with SHA-256 from its file, as the content store does.
// Both nodes run in this process: the CPU reported is both ends'. It is the piece path's
// counterpart of agent/swarm's BenchmarkTwoAgentTransfer (the torrent client's), against the
// same floor (BenchmarkHTTPCopySHA256 there).
//
//	SHOAL_BENCH_BLOB_MIB=1024 go test -run '^$' -bench TwoNodeTransfer -benchtime 2x ./agent/piecewire
func BenchmarkTwoNodeTransfer(b *testing.B) {
	blob := newTestBlob(1, benchcpu.BlobSize(b), 1<<20)
	held := blob.file(b, blob.data)
	var cpu time.Duration
	b.ResetTimer() // not the blob's generation
	for n := range b.N {
		b.StopTimer()
		holder, node := newTestNode(b, "127.0.0.2"), newTestNode(b, "127.0.0.3")
		hb, err := holder.AddBlob(blob.name, int64(len(blob.data)), blob.pieceLength, reopenable{held}, held)
		if err != nil {
			b.Fatal(err)
		}
		f, err := os.Create(filepath.Join(b.TempDir(), "blob"))
		if err != nil {
			b.Fatal(err)
		}
		bl, err := node.AddBlob(blob.name, int64(len(blob.data)), blob.pieceLength, f, f)
		if err != nil {
			b.Fatal(err)
		}
		stop := func() {}
		if n == 0 { // the first transfer's profile
			stop = benchcpu.Profile(b)
		}
		start := benchcpu.ProcessCPU(b)
		b.StartTimer()
		// The holder hashes its pieces from its file, as a seeder builds the segments' infos.
		hashes := hashPieces(b, held, int64(len(blob.data)), blob.pieceLength)
		if err := hb.SetHashes(0, hashes, AllComplete); err != nil {
			b.Fatal(err)
		}
		if err := bl.SetHashes(0, hashes, AllIncomplete); err != nil {
			b.Fatal(err)
		}
		bl.SetPriority(0, blob.pieces(), PriorityNormal)
		bl.AddPeers([]netip.AddrPort{holder.addr})
		<-bl.Complete()
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, 0, int64(len(blob.data)))); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		cpu += benchcpu.ProcessCPU(b) - start
		stop()
		if hex.EncodeToString(h.Sum(nil)) != blob.name {
			b.Fatal("the fetched blob's digest differs")
		}
		holder.Close()
		node.Close()
		f.Close()
	}
	b.SetBytes(int64(len(blob.data)))
	benchcpu.ReportPerGiB(b, cpu, int64(len(blob.data))*int64(b.N))
}

// hashPieces returns the SHA-1 of every piece of the size bytes in f.
func hashPieces(b *testing.B, f *os.File, size, pieceLength int64) []byte {
	buf := make([]byte, pieceLength)
	var out []byte
	for off := int64(0); off < size; off += pieceLength {
		n, err := f.ReadAt(buf[:min(pieceLength, size-off)], off)
		if err != nil {
			b.Fatal(err)
		}
		sum := sha1.Sum(buf[:n]) //nolint:gosec // piece hashes
		out = append(out, sum[:]...)
	}
	return out
}

// BenchmarkWriteNewFile measures what every node pays for the bytes it receives, whatever moves
// them: writing them into a new file, 64 KiB at a time as a fetch does. In "kept" every file
// stays until the end, so each write needs new page-cache pages; in "recycled" each file is
// removed before the next is written, whose pages the kernel hands out again at once. On a
// virtual machine whose host takes freed guest memory back, a new page costs a fault in the
// host, and "kept" costs several times "recycled" (benchmarks.md, "Two agents, one blob").
//
//	SHOAL_BENCH_BLOB_MIB=1024 go test -run '^$' -bench WriteNewFile -benchtime 3x ./agent/piecewire
func BenchmarkWriteNewFile(b *testing.B) {
	size := benchcpu.BlobSize(b)
	chunk := make([]byte, 64<<10)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for _, keep := range []bool{true, false} {
		name := "recycled"
		if keep {
			name = "kept"
		}
		b.Run(name, func(b *testing.B) {
			dir := b.TempDir()
			var cpu time.Duration
			for n := range b.N {
				path := filepath.Join(dir, strconv.Itoa(n))
				f, err := os.Create(path)
				if err != nil {
					b.Fatal(err)
				}
				start := benchcpu.ProcessCPU(b)
				for off := 0; off < size; off += len(chunk) {
					if _, err := f.WriteAt(chunk, int64(off)); err != nil {
						b.Fatal(err)
					}
				}
				cpu += benchcpu.ProcessCPU(b) - start
				f.Close()
				if !keep {
					if err := os.Remove(path); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.SetBytes(int64(size))
			benchcpu.ReportPerGiB(b, cpu, int64(size)*int64(b.N))
		})
	}
}
