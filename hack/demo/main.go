// Command demo runs Shoal's story on this machine and prints what happened. First one node: a
// registry, containerd 1.6 and the shoal agent, in a network namespace of their own; a cold
// pull through the agent, a warm pull by a fresh containerd served from the agent's store,
// and a pull with the agent killed that still succeeds because containerd falls back to the
// registry. Then Kubernetes: a cluster of real kubelets, each node with its own containerd
// 2.x, on network namespaces behind a shaped bridge (test/cluster); Shoal's image built
// without Docker and installed from charts/shoal with helm; a new image rolled out to every
// node, for which the registry sends about one copy; and a Prewarm.
//
// Run from the repository as root: go run ./hack/demo (the Makefile's `make demo`).
// SHOAL_BINARY=/path/to/shoal uses that binary instead of building ./cmd/shoal.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// registryName is the made-up registry the demo image is pulled by.
const registryName = "registry.test"

type config struct {
	layers   int
	layerMiB int64
	timeout  time.Duration
	keep     bool
	verbose  bool
	nodes    int
	rateMbit int
	regMbit  int
}

func main() {
	var cfg config
	flag.IntVar(&cfg.layers, "layers", 4, "layers in the demo image")
	flag.Int64Var(&cfg.layerMiB, "layer-mib", 16, "size of each layer in MiB")
	flag.DurationVar(&cfg.timeout, "timeout", 5*time.Minute, "give up after this long")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work directory (logs, stores) for inspection")
	flag.BoolVar(&cfg.verbose, "v", false, "log what the harness starts and stops")
	flag.IntVar(&cfg.nodes, "nodes", 4, "nodes in the Kubernetes part (0 skips it)")
	flag.IntVar(&cfg.rateMbit, "rate-mbit", 200, "link rate of each node in the Kubernetes part, in Mbit/s")
	flag.IntVar(&cfg.regMbit, "registry-rate-mbit", 200, "link rate of the registry in the Kubernetes part, in Mbit/s (a registry, or a site's egress, no faster than one node's link)")
	flag.Parse()

	code, err := harness.RunIsolated(func() int {
		if err := run(cfg, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "demo:", err)
			return 1
		}
		return 0
	}, harness.BuildShoalFirst(), testbed.RaiseNeighbourLimits())
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		if errors.Is(err, harness.ErrIsolationUnavailable) {
			fmt.Fprintln(os.Stderr, "demo: run it as root on Linux with util-linux and iproute2 (the demo needs its own network namespace)")
		}
		os.Exit(1)
	}
	os.Exit(code)
}

// step is one pull and what it cost.
type step struct {
	name         string
	err          error
	took         time.Duration
	blobGETs     int   // at the registry, during the step
	registryBlob int64 // blob bytes the registry sent
	fromUpstream int64 // bytes the agent served that it fetched upstream; -1 = agent down
	fromStore    int64 // bytes the agent served from its store; -1 = agent down
	directGETs   int   // registry blob GETs made by containerd itself (fallback)
}

func run(cfg config, out io.Writer) error {
	// Interrupted, the demo still stops everything it started and removes its directory.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	level := slog.LevelWarn
	if cfg.verbose {
		level = slog.LevelInfo
	}
	logOpt := harness.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))

	bin, err := harness.ShoalBinary()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "shoal-demo-")
	if err != nil {
		return err
	}
	if cfg.keep {
		fmt.Fprintf(out, "work directory (kept): %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	hostsDir := filepath.Join(dir, "certs.d")

	fmt.Fprintln(out, "starting registry, agent and containerd in a private network namespace...")
	reg, err := harness.StartRegistry(ctx, filepath.Join(dir, "registry"), logOpt)
	if err != nil {
		return err
	}
	defer reg.Close()
	agent, err := harness.StartAgent(ctx, harness.AgentConfig{
		Binary:            bin,
		DataDir:           filepath.Join(dir, "agent", "data"),
		HostsDir:          hostsDir,
		MirrorRegistries:  []string{registryName},
		RegistryEndpoints: map[string]string{registryName: reg.URL()},
		CacheSize:         "2Gi",
	}, logOpt)
	if err != nil {
		return err
	}
	defer agent.Close()

	fmt.Fprintf(out, "pushing a random %d-layer image (%d MiB per layer) to the registry...\n", cfg.layers, cfg.layerMiB)
	img, err := harness.PushImage(ctx, reg.Host(), "demo/app:v1", harness.ImageSpec{Layers: cfg.layers, LayerSize: cfg.layerMiB << 20})
	if err != nil {
		return err
	}
	ref := img.Name(registryName)

	d := &demo{ctx: ctx, dir: dir, hostsDir: hostsDir, reg: reg, agent: agent, img: img, logOpt: logOpt}
	var steps []*step
	for _, st := range []struct {
		name, containerd string
		agentUp          bool
	}{
		{"1. cold pull through the agent", "containerd-1", true},
		{"2. warm pull, fresh containerd", "containerd-2", true},
		{"3. agent killed: fallback", "containerd-3", false},
	} {
		if !st.agentUp {
			if err := agent.Kill(); err != nil {
				return err
			}
		}
		steps = append(steps, d.pull(st.name, st.containerd, st.agentUp))
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("stopped during %q: %w", st.name, context.Cause(ctx))
		}
	}

	fmt.Fprintf(out, "\nimage %s: %d blobs, %s (config + layers)\n", ref, len(img.Blobs()), mib(img.BlobBytes()))
	fmt.Fprintf(out, "registry http://%s, agent mirror %s, containerd 1.6 via CRI PullImage\n\n", reg.Host(), agent.MirrorAddr())
	if err := report(out, steps, img); err != nil {
		return err
	}
	if cfg.nodes <= 0 {
		return nil
	}
	return clusterStory(ctx, out, cfg, bin)
}

// demo holds what the steps share.
type demo struct {
	ctx      context.Context
	dir      string
	hostsDir string
	reg      *harness.Registry
	agent    *harness.Agent
	img      *harness.Image
	logOpt   harness.Option
}

// pull starts a fresh containerd (empty content store) and pulls the image through CRI,
// measuring the registry's access log and, when the agent is up, the agent's metrics.
func (d *demo) pull(name, ctdName string, agentUp bool) *step {
	s := &step{name: name, fromUpstream: -1, fromStore: -1}
	ctd, err := harness.StartContainerd(d.ctx, filepath.Join(d.dir, ctdName), d.hostsDir, d.logOpt)
	if err != nil {
		s.err = err
		return s
	}
	defer ctd.Close()

	before, err := d.measure(agentUp)
	if err != nil {
		s.err = err
		return s
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(d.ctx, 2*time.Minute)
	_, s.err = ctd.CRI().PullImage(ctx, d.img.Name(registryName))
	cancel()
	s.took = time.Since(start)
	after, err := d.measure(agentUp)
	if err != nil {
		s.err = errors.Join(s.err, err)
		return s
	}

	blobs := map[v1.Hash]bool{}
	for _, b := range d.img.Blobs() {
		blobs[b] = true
	}
	for _, r := range after.requests[len(before.requests):] {
		h, ok := r.BlobDigest()
		if !ok || !blobs[h] {
			continue
		}
		s.blobGETs++
		s.registryBlob += r.Bytes
		if strings.HasPrefix(r.UserAgent, "containerd/") {
			s.directGETs++
		}
	}
	if agentUp {
		s.fromUpstream = int64(after.metrics.Value("shoal_mirror_bytes_total", map[string]string{"source": "upstream"}) -
			before.metrics.Value("shoal_mirror_bytes_total", map[string]string{"source": "upstream"}))
		s.fromStore = int64(after.metrics.Value("shoal_mirror_bytes_total", map[string]string{"source": "local"}) -
			before.metrics.Value("shoal_mirror_bytes_total", map[string]string{"source": "local"}))
	}
	return s
}

type measurement struct {
	requests []harness.Request
	metrics  harness.Metrics
}

func (d *demo) measure(agentUp bool) (measurement, error) {
	var m measurement
	if err := d.reg.Sync(d.ctx); err != nil {
		return m, err
	}
	var err error
	if m.requests, err = d.reg.Requests(); err != nil {
		return m, err
	}
	if agentUp {
		if m.metrics, err = d.agent.Metrics(d.ctx); err != nil {
			return m, err
		}
	}
	return m, nil
}

// report prints the table and the verdicts, and returns an error if the story did not hold.
func report(out io.Writer, steps []*step, img *harness.Image) error {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tRESULT\tTIME\tREGISTRY BLOB GETs\tBYTES FROM REGISTRY\tAGENT: FETCHED UPSTREAM\tAGENT: FROM ITS STORE")
	for _, s := range steps {
		result := "ok"
		if s.err != nil {
			result = "FAILED"
		}
		gets := fmt.Sprint(s.blobGETs)
		if s.directGETs > 0 {
			gets = fmt.Sprintf("%d (%d by containerd directly)", s.blobGETs, s.directGETs)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.name, result, s.took.Round(10*time.Millisecond),
			gets, mib(s.registryBlob), agentBytes(s.fromUpstream), agentBytes(s.fromStore))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	n := len(img.Blobs())
	cold, warm, fallback := steps[0], steps[1], steps[2]
	checks := []struct {
		ok   bool
		text string
	}{
		{cold.err == nil && cold.blobGETs == n && cold.directGETs == 0,
			fmt.Sprintf("cold pull: each of the %d blobs left the registry once, fetched by the agent", n)},
		{warm.err == nil && warm.blobGETs == 0 && warm.fromStore >= img.BlobBytes(),
			"warm pull by a fresh containerd: zero registry blob requests, everything from the agent's store"},
		{fallback.err == nil && fallback.directGETs == n,
			"agent killed: containerd fell back to the registry and the pull still succeeded"},
	}
	fmt.Fprintln(out, "\nTIME includes containerd unpacking the layers. Over loopback the registry is as fast as")
	fmt.Fprintln(out, "the agent's disk, so what the warm pull saves here is registry traffic, not seconds.")
	fmt.Fprintln(out)
	failed := false
	for _, c := range checks {
		mark := "PASS"
		if !c.ok {
			mark, failed = "FAIL", true
		}
		fmt.Fprintf(out, "%s  %s\n", mark, c.text)
	}
	for _, s := range steps {
		if s.err != nil {
			fmt.Fprintf(out, "\n%s: %v\n", s.name, s.err)
		}
	}
	if failed {
		return errors.New("the single-node story did not hold (see above)")
	}
	return nil
}

func agentBytes(n int64) string {
	if n < 0 {
		return "- (agent down)"
	}
	return mib(n)
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
