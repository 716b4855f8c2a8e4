package main

import (
	"math"
	"slices"
	"testing"

	"github.com/shoal-dev/shoal/test/testbed"
)

// TestLinkShare: the share counts the asking nodes only, over the whole seconds up to the last
// completion, against nodes × B × seconds.
func TestLinkShare(t *testing.T) {
	b := 8 * testbed.Mbit // 1 MB/s
	timeline := []second{
		{Links: []testbed.Traffic{{Received: 9e9, Sent: 9e9}, {Received: 1e6, Sent: 5e5}, {Received: 5e5, Sent: 0}}},
		{Links: []testbed.Traffic{{Received: 9e9, Sent: 9e9}, {Received: 5e5, Sent: 5e5}, {Received: 0, Sent: 0}}},
		{Links: []testbed.Traffic{{Received: 9e9, Sent: 9e9}, {Received: 1e6, Sent: 1e6}, {Received: 1e6, Sent: 1e6}}},
	}
	got := linkShare(timeline, 1, 1.5, b) // seconds 1 and 2 of nodes 1 and 2
	if want := (Traffic{Down: 2e6 / 4e6, Up: 1e6 / 4e6}); math.Abs(got.Down-want.Down) > 1e-9 || math.Abs(got.Up-want.Up) > 1e-9 {
		t.Errorf("linkShare = %+v, want %+v", got, want)
	}
	if got := linkShare(nil, 0, 10, b); got != (Traffic{}) {
		t.Errorf("empty timeline: %+v, want zero", got)
	}
}

// TestCPUProfileFlag: profiles need the agents' pprof endpoint and a kept testbed directory.
func TestCPUProfileFlag(t *testing.T) {
	cfg, err := parseFlags([]string{"-cpu-profile-seconds", "30", "-agent-arg=--max-upload-rate=20M"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.profileSeconds != 30 || !cfg.keep || !slices.Contains(cfg.agentArgs, "--pprof") || !slices.Contains(cfg.agentArgs, "--max-upload-rate=20M") {
		t.Errorf("config = %+v; want 30 s of profile, -keep, and --pprof added to the agent arguments", cfg)
	}
	if cfg, err = parseFlags(nil); err != nil || cfg.keep || slices.Contains(cfg.agentArgs, "--pprof") {
		t.Errorf("without -cpu-profile-seconds: %+v, %v; want no -keep and no --pprof", cfg, err)
	}
	if _, err := parseFlags([]string{"-cpu-profile-seconds", "-1"}); err == nil {
		t.Error("a negative -cpu-profile-seconds was accepted")
	}
}

// TestSizesAndRuns: -size-mib takes a list and -runs a count; bad values are refused.
func TestSizesAndRuns(t *testing.T) {
	cfg, err := parseFlags([]string{"-size-mib", "16, 64,1024", "-runs", "3"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []int64{16 << 20, 64 << 20, 1 << 30}; !slices.Equal(cfg.sizes, want) || cfg.runs != 3 {
		t.Errorf("sizes %v, runs %d; want %v and 3", cfg.sizes, cfg.runs, want)
	}
	for _, args := range [][]string{{"-size-mib", "0"}, {"-size-mib", "64,x"}, {"-runs", "0"}} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("%v was accepted", args)
		}
	}
}

// TestSummaryIsTheMedianRun: each (N, S, scenario) cell gives the median p99 of its runs with
// their range, leaves out the direct baseline, failed runs and skipped cells, and holds small
// blobs to S/B + 1 s.
func TestSummaryIsTheMedianRun(t *testing.T) {
	run := func(n int, size int64, sc string, p99, cpu float64) *result {
		return &result{Nodes: n, Size: size, Scenario: sc, P99: p99, AgentCPUPerGiB: cpu, SOverB: float64(size) / (100e6 / 8)}
	}
	results := []*result{
		run(8, 64<<20, scenarioDirect, 2, 0),
		run(8, 64<<20, scenarioCold, 1.4, 9), run(8, 64<<20, scenarioWarm, 1.1, 8),
		run(8, 64<<20, scenarioCold, 1.2, 7), run(8, 64<<20, scenarioWarm, 1.0, 6),
		run(8, 64<<20, scenarioCold, 1.3, 8),
		{Nodes: 8, Size: 64 << 20, Scenario: scenarioCold, P99: 9, Error: "boom"},
		{Nodes: 32, Size: 1 << 30, Skipped: "no disk"},
		run(8, 16<<20, scenarioCold, 1.5, 20),
	}
	cells := summarise(results)
	if len(cells) != 3 {
		t.Fatalf("%d cells, want 3 (cold and warm at 64 MiB, cold at 16 MiB): %+v", len(cells), cells)
	}
	cold := cells[0]
	if cold.scenario != scenarioCold || cold.runs != 3 || cold.p99 != 1.3 || cold.p99Min != 1.2 || cold.p99Max != 1.4 || cold.cpuPerGiB != 8 {
		t.Errorf("cold 64 MiB = %+v; want 3 runs, p99 1.3 (1.2-1.4), 8 CPU-s/GiB", cold)
	}
	if warm := cells[1]; warm.runs != 2 || math.Abs(warm.p99-1.05) > 1e-9 {
		t.Errorf("warm 64 MiB = %+v; want 2 runs, p99 1.05 (the mean of the middle two)", warm)
	}
	if cold.goal != 1.25 {
		t.Errorf("goal at 64 MiB and 100 Mbit/s = %.2f, want 1.25", cold.goal)
	}
	img := []*result{
		{Nodes: 8, Size: 256 << 20, Scenario: scenarioImageCold, P99: 1.5, SOverB: 20, FloorSeconds: 4, Layers: 8},
		{Nodes: 8, Size: 256<<20 + 4096, Scenario: scenarioImageCold, P99: 1.7, SOverB: 20, FloorSeconds: 4, Layers: 8},
		{Nodes: 8, Size: 256 << 20, Scenario: scenarioImageDirect, P99: 2, SOverB: 20, Layers: 8},
	}
	if ic := summarise(img); len(ic) != 1 || ic[0].runs != 2 || math.Abs(ic[0].goal-1.45) > 1e-9 || ic[0].floor != 4 {
		t.Errorf("image cells = %+v; want one (two runs of images of different sizes, not the direct baseline) with goal 1.25 + 4 s / 20 s = 1.45", ic)
	}
	// 16 MiB at 100 Mbit/s: S/B = 1.34 s, so S/B + 1 s is 1.75 × S/B.
	if small := cells[2]; small.goal < 1.7 || small.goal > 1.8 {
		t.Errorf("goal at 16 MiB = %.3f, want S/B + 1 s ≈ 1.75", small.goal)
	}
}

// TestSkipCell: a cell runs unless its stores exceed -max-cell-gib or, without it, 70 % of the
// free disk.
func TestSkipCell(t *testing.T) {
	cfg := config{maxCellBytes: 16 << 30}
	if why := skipCell(cfg, 16, 1<<30, 1<<40); why != "" {
		t.Errorf("16 × 1 GiB under a 16 GiB cap skipped: %s", why)
	}
	if why := skipCell(cfg, 32, 1<<30, 1<<40); why == "" {
		t.Error("32 × 1 GiB under a 16 GiB cap ran")
	}
	cfg.maxCellBytes = 0
	if why := skipCell(cfg, 32, 1<<30, 40<<30); why == "" {
		t.Error("32 GiB of stores ran with 40 GiB free")
	}
	if why := skipCell(cfg, 32, 1<<30, 0); why != "" {
		t.Errorf("skipped with the free space unknown: %s", why)
	}
}
