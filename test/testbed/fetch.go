package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// FetchBinaryEnv names the variable that hands the fetch client (hack/testbedfetch) to the
// isolated child; BuildFetchFirst sets it.
const FetchBinaryEnv = "SHOAL_FETCH_BINARY"

// BuildFetchFirst is a harness.BeforeIsolation hook that builds ./hack/testbedfetch of the
// module around the working directory and hands its path to the isolated child in
// SHOAL_FETCH_BINARY, unless that is already set.
func BuildFetchFirst() harness.IsolateOption {
	return harness.BeforeIsolation(func(ctx context.Context, tmpDir string) ([]string, error) {
		if os.Getenv(FetchBinaryEnv) != "" {
			return nil, nil
		}
		mod, err := harness.ModuleDir(ctx)
		if err != nil {
			return nil, err
		}
		bin := filepath.Join(tmpDir, "fetch")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./hack/testbedfetch")
		cmd.Dir = mod
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build ./hack/testbedfetch: %w\n%s", err, out)
		}
		return []string{FetchBinaryEnv + "=" + bin}, nil
	})
}

// FetchSpec is one GET of a blob by the fetch client inside a node.
type FetchSpec struct {
	URL    string  // e.g. Node.MirrorBlobURL or Testbed.RegistryBlobURL
	Digest v1.Hash // the body must hash to it
	// Start is when to send the request (zero: at once); every node given the same Start
	// begins together, and times are measured from it.
	Start time.Time
	// Timeout bounds the fetch from Start (default 10 minutes).
	Timeout time.Duration
}

// FetchResult is the fetch client's report, one JSON line.
type FetchResult struct {
	Node    string  `json:"node"`
	Bytes   int64   `json:"bytes"`   // body bytes received
	TTFB    float64 `json:"ttfb_s"`  // seconds from Start to the first body byte
	Seconds float64 `json:"seconds"` // seconds from Start to the last byte, digest checked
	OK      bool    `json:"ok"`      // status 200 and the digest matched
	Error   string  `json:"error,omitempty"`
	// Progress[i] is the body bytes received by i+1 seconds after Start, the last entry the
	// total at the end: the node's delivery curve.
	Progress []int64 `json:"progress_bytes,omitempty"`
	// CPUSeconds is the client process's own CPU time; Node.Fetch adds it to the report.
	CPUSeconds float64 `json:"cpu_s"`
}

// Fetch runs the fetch client inside the node and returns its report. An error means the
// client could not run or report; a failed download is a result with OK false.
func (n *Node) Fetch(ctx context.Context, spec FetchSpec) (FetchResult, error) {
	bin := n.tb.cfg.fetchBinary
	if bin == "" {
		return FetchResult{}, fmt.Errorf("node %s: no fetch client: set %s (BuildFetchFirst) or use WithFetchBinary", n.name, FetchBinaryEnv)
	}
	timeout := spec.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Minute
	}
	start := spec.Start
	if start.IsZero() {
		start = time.Now()
	}
	// The client bounds itself; this context is the backstop, and Close ends it too.
	ctx, cancel := context.WithDeadline(ctx, start.Add(timeout+30*time.Second))
	defer cancel()
	stop := context.AfterFunc(n.tb.ctx, cancel)
	defer stop()
	cmd := n.Command(ctx, bin,
		"-node", n.name, "-url", spec.URL, "-digest", spec.Digest.String(),
		"-start", start.Format(time.RFC3339Nano), "-timeout", timeout.String())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run() // exit status 1 with a report is a failed download, not an error
	var res FetchResult
	if err := json.Unmarshal(bytes.TrimSpace(stdout.Bytes()), &res); err != nil {
		return FetchResult{}, fmt.Errorf("node %s: fetch %s: %w (report %q: %w; stderr %q)",
			n.name, spec.URL, errors.Join(runErr, ctx.Err()), stdout.String(), err, stderr.String())
	}
	if ps := cmd.ProcessState; ps != nil {
		res.CPUSeconds = (ps.UserTime() + ps.SystemTime()).Seconds()
	}
	return res, nil
}

// FetchAll runs spec on every node at once (spec(i) for node i; nil skips the node) and
// returns the results by node index. Results of skipped nodes are zero.
func (tb *Testbed) FetchAll(ctx context.Context, spec func(i int) *FetchSpec) ([]FetchResult, error) {
	results := make([]FetchResult, len(tb.nodes))
	errs := make([]error, len(tb.nodes))
	var wg sync.WaitGroup
	for i, n := range tb.nodes {
		s := spec(i)
		if s == nil {
			continue
		}
		wg.Go(func() { results[i], errs[i] = n.Fetch(ctx, *s) })
	}
	wg.Wait()
	return results, errors.Join(errs...)
}
