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
