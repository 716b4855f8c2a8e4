package main

import (
	"math"
	"strings"
	"testing"
)

// TestBucketQuantile: linear interpolation inside the bucket that holds the rank, from 0 below
// the first bound, and the highest finite bound for a rank in +Inf.
func TestBucketQuantile(t *testing.T) {
	cumulative := map[float64]uint64{0.1: 2, 0.2: 6, 0.4: 8, math.Inf(+1): 10}
	for _, tt := range []struct {
		q, want float64
	}{
		{0.1, 0.05},  // rank 1 of 2 in [0, 0.1]
		{0.5, 0.175}, // rank 5: 3 of 4 in [0.1, 0.2]
		{0.8, 0.4},   // rank 8: the top of [0.2, 0.4]
		{0.99, 0.4},  // in +Inf
	} {
		if got := bucketQuantile(cumulative, 10, tt.q); math.Abs(got-tt.want) > 1e-9 {
			t.Errorf("q%.2f = %v, want %v", tt.q, got, tt.want)
		}
	}
	if got := bucketQuantile(map[float64]uint64{math.Inf(+1): 0}, 0, 0.5); !math.IsNaN(got) {
		t.Errorf("empty histogram: %v, want NaN", got)
	}
}

// TestCountRequests: only the controller user's completed requests count; writes by verb and
// resource, refusals apart, reads by verb.
func TestCountRequests(t *testing.T) {
	log := strings.Join([]string{
		`{"stage":"ResponseComplete","verb":"create","user":{"username":"shoal-controller"},"objectRef":{"resource":"swarmseeds"},"responseStatus":{"code":201}}`,
		`{"stage":"ResponseComplete","verb":"create","user":{"username":"shoal-controller"},"objectRef":{"resource":"swarmseeds"},"responseStatus":{"code":409}}`,
		`{"stage":"ResponseComplete","verb":"patch","user":{"username":"shoal-controller"},"objectRef":{"resource":"nodecaches","subresource":"status"},"responseStatus":{"code":200}}`,
		`{"stage":"ResponseComplete","verb":"list","user":{"username":"shoal-controller"},"objectRef":{"resource":"pods"},"responseStatus":{"code":200}}`,
		`{"stage":"ResponseComplete","verb":"create","user":{"username":"admin"},"objectRef":{"resource":"pods"},"responseStatus":{"code":201}}`,
		`{"stage":"Panic","verb":"delete","user":{"username":"shoal-controller"},"objectRef":{"resource":"swarmseeds"}}`,
	}, "\n")
	got, err := countRequests(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	if got.Writes["create swarmseeds"] != 2 || got.Refused["create swarmseeds"] != 1 || got.Writes["patch nodecaches/status"] != 1 ||
		got.writes() != 3 || got.writesOf("swarmseeds") != 2 || got.Reads["list"] != 1 || len(got.Reads) != 1 {
		t.Errorf("countRequests = %+v", got)
	}
	if _, err := countRequests(strings.NewReader("not json\n")); err == nil {
		t.Error("a malformed line was accepted")
	}
}

// TestImageOf: each image gets one run of consecutive pods, every image at least one.
func TestImageOf(t *testing.T) {
	for _, tt := range []struct{ pods, images int }{{20000, 50}, {2000, 50}, {50, 50}, {7, 3}} {
		count := make([]int, tt.images)
		prev := 0
		for i := range tt.pods {
			img := imageOf(i, tt.pods, tt.images)
			if img < prev || img >= tt.images {
				t.Fatalf("pods %d images %d: pod %d has image %d after %d", tt.pods, tt.images, i, img, prev)
			}
			prev = img
			count[img]++
		}
		for img, n := range count {
			if n == 0 {
				t.Errorf("pods %d images %d: image %d has no pod", tt.pods, tt.images, img)
			}
		}
	}
}

// TestReplaceSection: only what is between the markers changes; a file without them is an error.
func TestReplaceSection(t *testing.T) {
	beginMarker, endMarker := markers("scale")
	doc := "intro\n" + beginMarker + "\nold\n" + endMarker + "\nafter\n"
	got, err := replaceSection(doc, "scale", "new\n")
	if want := "intro\n" + beginMarker + "\nnew\n" + endMarker + "\nafter\n"; err != nil || got != want {
		t.Errorf("replaceSection = %q, %v; want %q", got, err, want)
	}
	if _, err := replaceSection("no markers\n", "scale", "new\n"); err == nil {
		t.Error("a file without markers was accepted")
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 20000: "20,000", 1234567: "1,234,567", -2000: "-2,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestFlags: the defaults are the size with a baseline round, and nonsense is refused.
func TestFlags(t *testing.T) {
	cfg, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.nodes != 1000 || cfg.pods != 20000 || cfg.images != 50 || len(cfg.rounds()) != 2 || cfg.rounds()[0] != 2000 {
		t.Errorf("defaults = %+v, rounds %v", cfg, cfg.rounds())
	}
	if cfg, err := parseFlags([]string{"-baseline-pods", "0"}); err != nil || len(cfg.rounds()) != 1 {
		t.Errorf("-baseline-pods 0: rounds %v, %v; want one", cfg.rounds(), err)
	}
	for _, args := range [][]string{{"-images", "0"}, {"-pods", "10", "-baseline-pods", "0", "-images", "11"}, {"-rate", "0"}, {"-nodes", "0"}} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

// TestGrowth: equal writes are said not to grow, different ones are flagged; memory is per pod.
func TestGrowth(t *testing.T) {
	a := &result{Pods: 2000, WritesPerImage: 1.2, Requests: requests{Writes: map[string]int{"create swarmseeds": 60}}, PeakHeap: 10 << 20, PeakRSS: 50 << 20}
	b := &result{Pods: 20000, WritesPerImage: 1.2, Requests: requests{Writes: map[string]int{"create swarmseeds": 60}}, PeakHeap: 10<<20 + 18000*2048, PeakRSS: 50<<20 + 18000*4096}
	if got := growth(a, b); !strings.Contains(got, "do not grow") || !strings.Contains(got, "2.0 KiB of peak heap") || !strings.Contains(got, "4.0 KiB of peak RSS") {
		t.Errorf("growth = %q", got)
	}
	b.Requests.Writes["create swarmseeds"] = 600
	if got := growth(a, b); !strings.Contains(got, "grew with the pods") {
		t.Errorf("growth with more writes = %q", got)
	}
}
