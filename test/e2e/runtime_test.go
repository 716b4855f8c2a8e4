package e2e

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/shoal-dev/shoal/agent/criruntime"
	"github.com/shoal-dev/shoal/test/harness"
)

// TestRuntimePinsImages runs the agent's container runtime client against real containerd:
// 2.x pins what it imports (CRI reports the image pinned), releases only its own pins and
// leaves a pin it did not make; 1.6 imports, cannot pin, and says so.
func TestRuntimePinsImages(t *testing.T) {
	harness.RequireIsolation(t)
	c2, err := harness.Containerd2Binary()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		binary string
		canPin bool
	}{
		{"containerd 2", c2, true},
		{"containerd 1.6", harness.DefaultContainerdBinary, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			if _, err := harness.WriteDirectHosts(e.hostsDir, registryName, e.reg.URL()); err != nil {
				t.Fatal(err)
			}
			c, err := harness.StartContainerd(e.ctx, filepath.Join(e.dir, "containerd"), e.hostsDir,
				harness.WithBinary(tc.binary), harness.WithLogger(e.logger))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("containerd log:\n%s", tail(filepath.Join(e.dir, "containerd", "containerd.log"), 30))
				}
				e.closeOrLog("containerd", c.Close)
			})
			rt, err := criruntime.Dial("unix://"+c.Socket(), "")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = rt.Close() })

			img := e.pushImage("test/pinned:v1")
			ref := registryName + "/test/pinned@" + img.Digest.String()
			if st, err := rt.Status(e.ctx, ref); err != nil || st != criruntime.Absent {
				t.Fatalf("before import: %v, %v; want Absent", st, err)
			}
			if err := rt.Import(e.ctx, ref); err != nil {
				t.Fatal(err)
			}
			st, err := rt.Pin(e.ctx, ref)
			switch {
			case tc.canPin && (err != nil || st != criruntime.Pinned):
				t.Fatalf("Pin = %v, %v; want Pinned", st, err)
			case !tc.canPin && (!errors.Is(err, criruntime.ErrCannotPin) || st != criruntime.Imported):
				t.Fatalf("Pin = %v, %v; want Imported and ErrCannotPin", st, err)
			}
			cri, err := c.CRI().ImageStatus(e.ctx, ref)
			if err != nil || cri == nil {
				t.Fatalf("CRI ImageStatus = %v, %v", cri, err)
			}
			if cri.GetPinned() != tc.canPin {
				t.Errorf("CRI reports pinned = %v, want %v", cri.GetPinned(), tc.canPin)
			}
			ours, err := rt.PinnedByOwner(e.ctx)
			if err != nil || !slices.Equal(ours, []string{ref}) {
				t.Errorf("PinnedByOwner = %v, %v; want [%s]", ours, err, ref)
			}
			if err := rt.Unpin(e.ctx, ref); err != nil {
				t.Fatal(err)
			}
			if st, err := rt.Status(e.ctx, ref); err != nil || st != criruntime.Imported {
				t.Errorf("after Unpin: %v, %v; want Imported (unpinned, never removed)", st, err)
			}
			if !tc.canPin {
				return
			}
			// The sandbox image is pinned by containerd's own setting, not by Shoal: Pin
			// leaves it unmarked, so Unpin never releases it.
			e.pushImage("pause:3.9")
			pauseRef := registryName + "/pause:3.9"
			if err := rt.Import(e.ctx, pauseRef); err != nil {
				t.Fatal(err)
			}
			if st, err := rt.Status(e.ctx, pauseRef); err != nil || st != criruntime.Pinned {
				t.Fatalf("sandbox image: %v, %v; want Pinned by containerd's configuration", st, err)
			}
			if _, err := rt.Pin(e.ctx, pauseRef); err != nil {
				t.Fatal(err)
			}
			if err := rt.Unpin(e.ctx, pauseRef); err != nil {
				t.Fatal(err)
			}
			if st, err := rt.Status(e.ctx, pauseRef); err != nil || st != criruntime.Pinned {
				t.Errorf("sandbox image after Pin and Unpin: %v, %v; want Pinned still", st, err)
			}
		})
	}
}
