package harness

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// recordingTB is a TB that records how a test ended: Skip and Fatal end the calling goroutine,
// as testing's do.
type recordingTB struct {
	ended string // "skip: ..." or "fatal: ..." or "" when the test went on
}

func (r *recordingTB) Helper() {}

func (r *recordingTB) Skip(args ...any) {
	r.ended = "skip: " + fmt.Sprint(args...)
	runtime.Goexit()
}

func (r *recordingTB) Fatal(args ...any) {
	r.ended = "fatal: " + fmt.Sprint(args...)
	runtime.Goexit()
}

// TestRequireIsolation: an isolated test goes on; one that is not is skipped with the reason
// IsolateNetwork found, or fails under SHOAL_E2E=1.
func TestRequireIsolation(t *testing.T) {
	tests := []struct {
		name     string
		isolated bool
		reason   string
		required bool
		want     string // prefix of how the test ended
	}{
		{"isolated", true, "", false, ""},
		{"isolated under SHOAL_E2E", true, "", true, ""},
		{"not root", false, "needs root", false, "skip: needs its own network namespace: needs root"},
		{"not root under SHOAL_E2E", false, "needs root", true, "fatal: needs its own network namespace: needs root"},
		{"no IsolateNetwork in TestMain", false, "", false, "skip: needs its own network namespace: the test binary did not run under harness.IsolateNetwork"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r recordingTB
			done := make(chan struct{})
			go func() {
				defer close(done)
				requireIsolation(&r, tt.isolated, tt.reason, tt.required)
			}()
			<-done
			if tt.want == "" && r.ended != "" || !strings.HasPrefix(r.ended, tt.want) {
				t.Errorf("requireIsolation ended the test with %q, want %q", r.ended, tt.want)
			}
		})
	}
}

// TestNoProcessesWhenNotIsolated: once IsolateNetwork has fallen back to running the tests
// un-isolated, the harness refuses to start components, so a test that forgot
// RequireIsolation fails instead of running them in the machine's network namespace.
func TestNoProcessesWhenNotIsolated(t *testing.T) {
	saved := notIsolated
	notIsolated = "needs root for `unshare --net` (test)"
	t.Cleanup(func() { notIsolated = saved })

	reg, err := StartRegistry(context.Background(), t.TempDir())
	if err == nil {
		_ = reg.Close()
		t.Fatal("StartRegistry started a registry outside the isolated namespace")
	}
	if !strings.Contains(err.Error(), "RequireIsolation") {
		t.Errorf("StartRegistry: %v; want an error that names RequireIsolation", err)
	}
}
