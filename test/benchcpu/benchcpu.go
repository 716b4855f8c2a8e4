// Package benchcpu holds what the transfer benchmarks share: the blob size they move, this
// process's CPU time, the cost per GiB they report, and an optional CPU profile.
package benchcpu

import (
	"os"
	"runtime/pprof"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BlobSize is the blob a transfer benchmark moves: SHOAL_BENCH_BLOB_MIB MiB, default 256 (the
// project's figures are for 1024).
func BlobSize(b *testing.B) int {
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

// ProcessCPU is the CPU time this process has used, user and system.
func ProcessCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// ReportPerGiB reports cpu over the bytes moved as cpu-s/GiB, the figure a data path's cost is
// judged by (a copy plus sha256 costs about 1-1.5 CPU-s per GiB here).
func ReportPerGiB(b *testing.B, cpu time.Duration, bytes int64) {
	b.ReportMetric(cpu.Seconds()/(float64(bytes)/(1<<30)), "cpu-s/GiB")
}

// Profile writes a CPU profile to $SHOAL_BENCH_CPUPROFILE, when it is set, from now until the
// returned function is called: around the transfer alone, not the setup that generates and
// hashes the blob.
func Profile(b *testing.B) (stop func()) {
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
