// Command scalebench measures Shoal's controller at cluster scale: a real kube-apiserver and
// etcd (test/kubeenv) with N Nodes, `shoal controller` as a process of its own, an in-process
// registry with I distinct small images, and P pending Pods of those images created at a steady
// rate. It reports what the pod seeding costs and how fast it is:
//
//   - the controller's peak RSS (VmHWM) and peak Go heap in use (its /metrics, each second);
//   - the controller's API writes while the pods arrive, from the API server's audit log (the
//     controller runs as a user of its own, bound to the generated ClusterRole), per distinct
//     image and per distinct manifest: they must not grow with the pods, which a first round
//     with fewer pods (-baseline-pods) against the same nodes and images shows;
//   - the time from a pod's creation to the SwarmSeed of its image being written: the
//     controller's shoal_controller_seed_latency_seconds histogram, and, as a cross-check, a
//     watch on SwarmSeeds in the benchmark (its clock, in milliseconds) and the objects'
//     creation timestamps (whole seconds);
//   - wall time, pods created per second, reconciles, and the machine's CPU use.
//
// Each round starts a fresh controller; between rounds the pods and SwarmSeeds are deleted. It
// prints a Markdown table, writes it between <!-- BEGIN scale --> and <!-- END scale --> of -doc
// when given, and everything measured to -json. Run as root it runs in a network namespace of its
// own with loopback only; otherwise on this machine's loopback.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
)

type config struct {
	nodes        int
	pods         int
	baselinePods int // pods of a first round; 0 = no such round
	images       int
	indexEvery   int // every k-th image is a multi-platform index
	layers       int
	layerSize    int64
	rate         float64 // pods created per second
	concurrency  int     // pod and node creations in flight
	seedTTL      time.Duration
	timeout      time.Duration // bound on the whole run
	doc          string
	jsonOut      string
	keep         bool
	prewarms     int // Prewarms of the Prewarm phase; 0 = no such phase
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("scalebench", flag.ContinueOnError)
	nodes := fs.Int("nodes", 1000, "Nodes, linux/amd64 and (one in four) linux/arm64")
	pods := fs.Int("pods", 20000, "pending Pods of the measured round, half bound to a node, half unbound")
	baseline := fs.Int("baseline-pods", 2000, "pending Pods of a first round with the same nodes and images, to show that writes do not grow with pods; 0 = none")
	images := fs.Int("images", 50, "distinct images the pods use")
	indexEvery := fs.Int("index-every", 5, "every k-th image is an index of linux/amd64, linux/arm64 and linux/s390x (no node has s390x); the others single manifests; 0 = none")
	layers := fs.Int("layers", 3, "layers of each image")
	layerKiB := fs.Int64("layer-kib", 4, "size of each layer in KiB")
	rate := fs.Float64("rate", 200, "pods created per second")
	concurrency := fs.Int("concurrency", 16, "creations in flight at once")
	seedTTL := fs.Duration("seed-ttl", 2*time.Hour, "the controller's --seed-ttl: longer than the run, so that no SwarmSeed is deleted while it is measured")
	timeout := fs.Duration("timeout", 45*time.Minute, "bound on the whole run")
	doc := fs.String("doc", "", `Markdown file whose scale section is rewritten; "" = none`)
	jsonOut := fs.String("json", "", "also write everything measured, with a per-second timeline, to this JSON file")
	keep := fs.Bool("keep", false, "keep the work directory (controller logs, audit log) for a post-mortem")
	prewarms := fs.Int("prewarms", 0, "after the pod rounds, a phase in which this many Prewarms (one image each) select every node and every node's agent reports its items Ready (one status write each, at -rate); its section of -doc is scale-prewarm; 0 = none")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	cfg := config{
		nodes: *nodes, pods: *pods, baselinePods: *baseline, images: *images, indexEvery: *indexEvery,
		layers: *layers, layerSize: *layerKiB << 10, rate: *rate, concurrency: *concurrency,
		seedTTL: *seedTTL, timeout: *timeout, doc: *doc, jsonOut: *jsonOut, keep: *keep, prewarms: *prewarms,
	}
	switch {
	case cfg.nodes < 1:
		return config{}, errors.New("-nodes must be at least 1")
	case cfg.prewarms < 0:
		return config{}, errors.New("-prewarms must not be negative")
	case cfg.pods < 0 || cfg.baselinePods < 0 || (cfg.pods == 0 && (cfg.baselinePods > 0 || cfg.prewarms == 0)):
		return config{}, errors.New("-pods must be at least 1 (0 only with -prewarms and no -baseline-pods) and -baseline-pods not negative")
	case cfg.images < 1 || (cfg.pods > 0 && cfg.images > cfg.pods) || (cfg.baselinePods > 0 && cfg.images > cfg.baselinePods):
		return config{}, errors.New("-images must be at least 1 and at most the pods of every round")
	case cfg.prewarms > cfg.images:
		return config{}, errors.New("-prewarms must be at most -images (one image each)")
	case cfg.indexEvery < 0 || cfg.layers < 1 || cfg.layerSize < 1:
		return config{}, errors.New("-index-every must not be negative, -layers and -layer-kib must be positive")
	case cfg.rate <= 0 || cfg.concurrency < 1:
		return config{}, errors.New("-rate and -concurrency must be positive")
	case cfg.seedTTL <= 0 || cfg.timeout <= 0:
		return config{}, errors.New("-seed-ttl and -timeout must be positive")
	}
	return cfg, nil
}

// rounds are the pod counts measured, in order.
func (cfg config) rounds() []int {
	switch {
	case cfg.pods == 0:
		return nil
	case cfg.baselinePods > 0:
		return []int{cfg.baselinePods, cfg.pods}
	}
	return []int{cfg.pods}
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// Everything below runs again in a child inside its own network namespace; the build of
	// shoal runs here first because it may need the module proxy.
	code, err := harness.RunIsolated(func() int { return run(cfg) }, harness.BuildShoalFirst())
	if errors.Is(err, harness.ErrIsolationUnavailable) {
		// Every server binds loopback, so the run is the same, only less fenced in.
		fmt.Fprintf(os.Stderr, "scalebench: %v; running on this machine's loopback\n", err)
		code = run(cfg)
		err = nil
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "scalebench:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(cfg config) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	dir, err := os.MkdirTemp("", "scalebench-")
	if err != nil {
		log.Error("work directory", "err", err)
		return 1
	}
	if cfg.keep {
		log.Info("keeping the work directory", "dir", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	bin, err := shoalBinary(ctx, dir)
	if err != nil {
		log.Error("shoal binary", "err", err)
		return 1
	}

	b, err := newBench(ctx, log, cfg, dir, bin)
	if b != nil {
		defer b.close()
	}
	if err != nil {
		log.Error("setting up", "err", err)
		return 1
	}
	var results []*result
	failed := false
	for i, pods := range cfg.rounds() {
		res, err := b.round(ctx, i+1, pods)
		if res != nil {
			results = append(results, res)
		}
		if err != nil {
			log.Error("round failed", "round", i+1, "pods", pods, "err", err)
			failed = true
			break
		}
	}
	report := &report{Config: b.describe(), Startup: b.startup, Rounds: results, Date: time.Now().UTC().Format("2006-01-02")}
	if len(results) > 0 {
		printTable(os.Stdout, report)
	}
	if cfg.prewarms > 0 && !failed {
		var res *prewarmResult
		var err error
		if n := len(cfg.rounds()); n > 0 {
			// The last round's pods and SwarmSeeds go first: the phase measures Prewarms alone.
			err = b.clear(ctx, fmt.Sprintf("scale-%d", n))
		}
		if err == nil {
			res, err = b.prewarmPhase(ctx, len(cfg.rounds())+1)
		}
		if err != nil {
			log.Error("Prewarm phase failed", "err", err)
			failed = true
		} else {
			report.Prewarm = res
			body := prewarmMarkdown(report.Date, os.Args[1:], res)
			fmt.Print("\n" + body)
			if cfg.doc != "" {
				if err := writeDoc(cfg.doc, "scale-prewarm", body); err != nil {
					log.Error("write doc", "err", err)
					failed = true
				}
			}
		}
	}
	if cfg.jsonOut != "" {
		if err := writeJSON(cfg.jsonOut, report); err != nil {
			log.Error("write results", "err", err)
			failed = true
		}
	}
	if cfg.doc != "" && !failed && len(results) > 0 && len(results) == len(cfg.rounds()) {
		if err := writeDoc(cfg.doc, "scale", markdown(report)); err != nil {
			log.Error("write doc", "err", err)
			failed = true
		} else {
			log.Info("wrote scale section", "doc", cfg.doc)
		}
	}
	if failed || ctx.Err() != nil {
		return 1
	}
	return 0
}

// shoalBinary is the binary BuildShoalFirst built before isolation, or one built now when the
// run could not isolate itself.
func shoalBinary(ctx context.Context, dir string) (string, error) {
	if bin, err := harness.ShoalBinary(); err == nil {
		return bin, nil
	}
	mod, err := harness.ModuleDir(ctx)
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "bin")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", err
	}
	return harness.BuildShoal(ctx, mod, out)
}
