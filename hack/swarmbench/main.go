// Command swarmbench runs the swarm benchmark of DESIGN.md §6 on test/testbed: for each node
// count N it builds N shaped nodes and a registry in an isolated network namespace, pushes a
// random blob of each size S asked for, and measures three scenarios, each with fresh agents
// (cold and warm -runs times per size, the summary giving the median run):
//
//   - direct: every node GETs the blob straight from the registry (the baseline; a smaller blob
//     at large N keeps it short, and every figure is in units of its own S/B);
//   - cold: every node asks its own agent at the same moment, nobody holds the blob;
//   - warm: node 0 fetches the blob through its agent first, then the other N−1 ask at once.
//
// It prints a table, writes the section between <!-- BEGIN swarm --> and <!-- END swarm --> of
// the Markdown file given by -doc, and the raw per-node results to -json. With
// -cpu-profile-seconds it also fetches a CPU profile from every agent (shoal agent --pprof) during
// each scenario that runs agents. Run as root.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

const (
	scenarioDirect = "direct"
	scenarioCold   = "cold"
	scenarioWarm   = "warm"
	repo           = "bench/blob"
)

type config struct {
	nodes          []int
	sizes          []int64 // S, bytes, in the order given
	runs           int     // of cold and warm per (N, S)
	directSize     int64   // baseline blob; 0 = S × min(1, 8/N)
	rate           testbed.Rate
	registryFactor float64
	scenarios      []string
	swarm          string // auto, on, off
	agentArgs      []string
	doc            string
	jsonOut        string
	startDelay     time.Duration
	keep           bool
	profileSeconds int    // CPU profile of every agent from the common start; 0 = none
	maxCellBytes   int64  // skip an (N, S) cell whose N × S is more; 0 = 70 % of the free disk
	imageSize      int64  // compressed size of the image scenarios' image
	section        string // of -doc, between <!-- BEGIN section --> and <!-- END section -->
	fromJSON       string // render -doc from this -json output instead of running
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("swarmbench", flag.ContinueOnError)
	nodes := fs.String("nodes", "8,16,32", "node counts N, comma-separated")
	sizesMiB := fs.String("size-mib", "256", "blob sizes S in MiB, comma-separated")
	maxCellGiB := fs.Int64("max-cell-gib", 0, "skip a node count and size whose N × S is more than this many GiB (the nodes' stores); 0 = 70 % of the disk's free space")
	imageMiB := fs.Int64("image-mib", 256, "compressed size in MiB of the realistic image the image-* scenarios pull through CRI")
	runs := fs.Int("runs", 1, "runs of cold and warm per node count and size (the summary gives the median)")
	directMiB := fs.Int64("direct-size-mib", 0, "blob size of the direct baseline (run once per N) in MiB; 0 = min(largest S, 256 MiB) × min(1, 8/N), so the baseline lasts about 2 × S/B")
	rateMbit := fs.Int64("rate-mbit", 0, "node link rate B in Mbit/s; 0 = 100 up to N = 16, halved each time N doubles beyond")
	factor := fs.Float64("registry-factor", 4, "registry link rate R as a multiple of B")
	scenarios := fs.String("scenarios", "direct,cold,warm", "scenarios to run, comma-separated")
	swarm := fs.String("swarm", "auto", "give agents --p2p-addr and --peers: on, off, or auto (when 'shoal agent --help' lists --p2p-addr)")
	doc := fs.String("doc", "docs/benchmarks.md", `Markdown file whose section is rewritten; "" = none`)
	fromJSON := fs.String("from-json", "", "run nothing: render the -doc section from this file, the -json output of a run given the same other flags (e.g. one that was interrupted)")
	section := fs.String("section", "swarm", "the section of -doc to rewrite: what is between <!-- BEGIN section --> and <!-- END section -->")
	jsonOut := fs.String("json", "", "also write every per-node result to this JSON file")
	delay := fs.Duration("start-delay", 2*time.Second, "how far ahead the common start time is set (plus 20 ms per node)")
	keep := fs.Bool("keep", false, "keep each testbed's directory (agent and registry logs, stores) for a post-mortem")
	profileSeconds := fs.Int("cpu-profile-seconds", 0, "run the agents with --pprof and fetch an N-second CPU profile from each, from the common start of every scenario that runs agents, into the testbed directory as <scenario>-n<i>.pprof; implies -keep")
	var agentArgs []string
	fs.Func("agent-arg", "extra argument for every agent (repeatable), e.g. -agent-arg=--max-upload-rate=20M", func(s string) error {
		agentArgs = append(agentArgs, s)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	cfg := config{
		runs:           *runs,
		maxCellBytes:   *maxCellGiB << 30,
		imageSize:      *imageMiB << 20,
		section:        *section,
		fromJSON:       *fromJSON,
		directSize:     *directMiB << 20,
		rate:           testbed.Rate(*rateMbit) * testbed.Mbit,
		registryFactor: *factor,
		swarm:          *swarm,
		agentArgs:      agentArgs,
		doc:            *doc,
		jsonOut:        *jsonOut,
		startDelay:     *delay,
		keep:           *keep || *profileSeconds > 0,
		profileSeconds: *profileSeconds,
	}
	if cfg.profileSeconds > 0 {
		cfg.agentArgs = append(cfg.agentArgs, "--pprof")
	}
	for f := range strings.SplitSeq(*nodes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 {
			return config{}, fmt.Errorf("-nodes: %q is not a node count of at least 2", f)
		}
		cfg.nodes = append(cfg.nodes, n)
	}
	for f := range strings.SplitSeq(*sizesMiB, ",") {
		mib, err := strconv.ParseInt(strings.TrimSpace(f), 10, 64)
		if err != nil || mib <= 0 {
			return config{}, fmt.Errorf("-size-mib: %q is not a positive size in MiB", f)
		}
		cfg.sizes = append(cfg.sizes, mib<<20)
	}
	for s := range strings.SplitSeq(*scenarios, ",") {
		s = strings.TrimSpace(s)
		if !slices.Contains(allScenarios, s) {
			return config{}, fmt.Errorf("-scenarios: unknown scenario %q (want %s)", s, strings.Join(allScenarios, ", "))
		}
		cfg.scenarios = append(cfg.scenarios, s)
	}
	switch {
	case !regexp.MustCompile(`^[a-z][a-z0-9-]*$`).MatchString(cfg.section):
		return config{}, fmt.Errorf("-section %q: want lower-case letters, digits and dashes", cfg.section)
	case cfg.imageSize < 1<<20:
		return config{}, errors.New("-image-mib must be at least 1")
	case cfg.maxCellBytes < 0:
		return config{}, errors.New("-max-cell-gib must not be negative")
	case cfg.runs < 1:
		return config{}, errors.New("-runs must be at least 1")
	case cfg.registryFactor <= 0:
		return config{}, errors.New("-registry-factor must be positive")
	case cfg.profileSeconds < 0:
		return config{}, errors.New("-cpu-profile-seconds must not be negative")
	case cfg.swarm != "auto" && cfg.swarm != "on" && cfg.swarm != "off":
		return config{}, fmt.Errorf("-swarm %q: want auto, on or off", cfg.swarm)
	}
	return cfg, nil
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
	if cfg.fromJSON != "" {
		if err := render(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "swarmbench:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// Everything below runs again in a child inside its own network namespace; the builds run
	// here first because they may need the module proxy.
	code, err := harness.RunIsolated(func() int { return run(cfg) }, harness.BuildShoalFirst(), testbed.BuildFetchFirst(), testbed.RaiseNeighbourLimits())
	if err != nil {
		fmt.Fprintln(os.Stderr, "swarmbench:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(cfg config) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	bin, err := harness.ShoalBinary()
	if err != nil {
		log.Error("no agent binary", "err", err)
		return 1
	}
	swarm, err := useSwarm(ctx, cfg.swarm, bin)
	if err != nil {
		log.Error("swarm flags", "err", err)
		return 1
	}
	log.Info("swarmbench", "nodes", cfg.nodes, "sizes_mib", mibs(cfg.sizes), "runs", cfg.runs, "scenarios", cfg.scenarios, "swarm", swarm)

	var results []*result
	failed := false
	for _, n := range cfg.nodes {
		rs, err := benchN(ctx, log, cfg, n, swarm)
		results = append(results, rs...)
		if err != nil {
			log.Error("benchmark failed", "nodes", n, "err", err)
			failed = true
		}
		if ctx.Err() != nil {
			break
		}
	}
	printTable(os.Stdout, results)
	if cfg.jsonOut != "" {
		if err := writeJSON(cfg.jsonOut, results); err != nil {
			log.Error("write results", "err", err)
			failed = true
		}
	}
	if cfg.doc != "" && len(results) > 0 && ctx.Err() == nil {
		if err := writeDoc(cfg.doc, cfg.section, markdown(cfg, swarm, results)); err != nil {
			log.Error("write doc", "err", err)
			failed = true
		} else {
			log.Info("wrote section", "doc", cfg.doc, "section", cfg.section)
		}
	}
	if failed || ctx.Err() != nil {
		return 1
	}
	return 0
}

// render writes the -doc section from the results in cfg.fromJSON, as the run that wrote them
// would have, dated by the file.
func render(cfg config) error {
	data, err := os.ReadFile(cfg.fromJSON)
	if err != nil {
		return err
	}
	var results []*result
	if err := json.Unmarshal(data, &results); err != nil {
		return fmt.Errorf("%s: %w", cfg.fromJSON, err)
	}
	if len(results) == 0 || cfg.doc == "" {
		return errors.New("nothing to render: no results, or no -doc")
	}
	st, err := os.Stat(cfg.fromJSON)
	if err != nil {
		return err
	}
	swarm := cfg.swarm != "off"
	for _, r := range results {
		swarm = swarm && (r.Swarm || isDirect(r.Scenario) || r.Skipped != "")
	}
	printTable(os.Stdout, results)
	return writeDoc(cfg.doc, cfg.section, markdownAt(cfg, swarm, results, st.ModTime(), commandArgs(os.Args[1:])))
}

// commandArgs are the arguments of the run a section describes: without -from-json, which
// only re-renders it.
func commandArgs(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-from-json" || a == "--from-json":
			i++
		case strings.HasPrefix(a, "-from-json=") || strings.HasPrefix(a, "--from-json="):
		default:
			out = append(out, a)
		}
	}
	return out
}

// useSwarm decides whether agents get --p2p-addr and --peers.
func useSwarm(ctx context.Context, mode, bin string) (bool, error) {
	if mode != "auto" {
		return mode == "on", nil
	}
	out, err := exec.CommandContext(ctx, bin, "agent", "--help").CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("%s agent --help: %w: %s", bin, err, out)
	}
	return strings.Contains(string(out), "--p2p-addr"), nil
}

// nodeRate is B for n nodes: 100 Mbit/s up to 16 nodes, halved each time n doubles beyond,
// so that all links together stay near 1.6 Gbit/s, what 2 cores can move (DESIGN.md §5).
func nodeRate(cfg config, n int) testbed.Rate {
	if cfg.rate > 0 {
		return cfg.rate
	}
	r := 100 * testbed.Mbit
	for k := 16; k < n; k *= 2 {
		r /= 2
	}
	return r
}

func directSize(cfg config, n int) int64 {
	if cfg.directSize > 0 {
		return cfg.directSize
	}
	base := min(slices.Max(cfg.sizes), 256<<20)
	if n <= 8 {
		return base
	}
	return max(base*8/int64(n)>>20<<20, 1<<20)
}

func mibs(sizes []int64) []int64 {
	out := make([]int64, len(sizes))
	for i, s := range sizes {
		out[i] = s >> 20
	}
	return out
}

// result is one scenario at one N.
type result struct {
	Nodes        int    `json:"nodes"`
	NodeRate     string `json:"node_rate"`
	RegistryRate string `json:"registry_rate"`
	Scenario     string `json:"scenario"`
	Run          int    `json:"run"`              // 1-based, of cold and warm at this (N, S)
	Layers       int    `json:"layers,omitempty"` // image scenarios: the image's layers
	// FloorSeconds is, in the image scenarios with agents, the time node 0 took to pull the
	// image again alone from its agent's store after the run: containerd's own work.
	FloorSeconds float64 `json:"unpack_floor_s,omitempty"`
	// ContainerdCPUSum is the nodes' containerd CPU time over the same span as AgentCPUSum.
	ContainerdCPUSum float64               `json:"containerd_cpu_s_sum,omitempty"`
	Swarm            bool                  `json:"swarm"`
	Size             int64                 `json:"size_bytes"`
	SOverB           float64               `json:"s_over_b_seconds"` // the unit of the times below
	Fetches          []testbed.FetchResult `json:"fetches"`
	OK               int                   `json:"ok"`
	Asked            int                   `json:"asked"`
	P50              float64               `json:"p50_s_over_b"`
	P99              float64               `json:"p99_s_over_b"`
	Max              float64               `json:"max_s_over_b"`
	UpstreamLink     float64               `json:"upstream_link_over_s"` // registry link bytes sent / S
	UpstreamLog      float64               `json:"upstream_log_over_s"`  // blob bytes in the access log / S
	// AgentCPUSum and AgentCPUMax are the agents' CPU time from just before the common start
	// to the last node's completion (not their start-up, nor node 0's first fetch in warm);
	// AgentCPUPerGiB is AgentCPUSum per GiB delivered to the asking nodes' clients.
	AgentCPUSum    float64 `json:"agent_cpu_s_sum"`
	AgentCPUMax    float64 `json:"agent_cpu_s_max"`
	AgentCPUPerGiB float64 `json:"agent_cpu_s_per_gib"`
	PeakRSSMax     int64   `json:"agent_peak_rss_max_bytes"`
	MachineCPU     float64 `json:"machine_cpu_utilisation"` // while the nodes fetched
	MachineBusy    float64 `json:"machine_cpu_busy_s"`
	MachineSteal   float64 `json:"machine_cpu_steal"` // share of all cores' time taken by the hypervisor for other machines
	// TestbedCPU is the CPU time of the agents, the registry and the fetch clients while the
	// nodes fetched: the machine is shared, so its busy time may include other work.
	TestbedCPU      float64 `json:"testbed_cpu_s"`
	TestbedCPUShare float64 `json:"testbed_cpu_utilisation"` // TestbedCPU over all cores' time
	Wall            float64 `json:"wall_s"`
	// LinkUse is the bytes the asking nodes' links carried, down and up, from the start to the
	// last node's completion, over what the links could carry meanwhile (nodes × B × time).
	LinkUse Traffic `json:"link_use"`
	// Timeline has one entry per second from the start: the run's link and CPU use.
	Timeline []second `json:"timeline,omitempty"`
	Error    string   `json:"error,omitempty"`
	// Skipped says why this (N, S) cell did not run (its other fields are then empty).
	Skipped string `json:"skipped,omitempty"`
}

// second is one second of a run: each node link's traffic (in node order) and the share of all
// cores busy.
type second struct {
	Links      []testbed.Traffic `json:"links"`
	MachineCPU float64           `json:"machine_cpu"`
}

// Traffic is a pair of link utilisations.
type Traffic struct {
	Down float64 `json:"down"`
	Up   float64 `json:"up"`
}

// benchN runs the scenarios on one testbed of n nodes.
func benchN(ctx context.Context, log *slog.Logger, cfg config, n int, swarm bool) (results []*result, err error) {
	b := nodeRate(cfg, n)
	r := testbed.Rate(float64(b) * cfg.registryFactor)
	log = log.With("nodes", n)
	log.Info("building testbed", "node_rate", b, "registry_rate", r)
	opts := []testbed.Option{testbed.WithNodeRate(b), testbed.WithRegistryRate(r), testbed.WithLogger(log)}
	if wantsImages(cfg) {
		opts = append(opts, testbed.WithContainerd())
	}
	if cfg.keep {
		opts = append(opts, testbed.WithKeepDir())
	}
	tb, err := testbed.New(ctx, n, opts...)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, tb.Close()) }()

	blobs := map[int64]v1.Hash{}
	blob := func(size int64) (v1.Hash, error) {
		if d, ok := blobs[size]; ok {
			return d, nil
		}
		log.Info("pushing blob", "mib", size>>20)
		d, err := tb.PushBlob(ctx, repo, size, uint64(size))
		blobs[size] = d
		return d, err
	}
	var errs []error
	runOne := func(sc string, size int64, run int) {
		d, err := blob(size)
		if err != nil {
			errs = append(errs, err)
			return
		}
		log.Info("scenario", "scenario", sc, "mib", size>>20, "run", run)
		res, err := runScenario(ctx, log, cfg, tb, sc, swarm, blobWorkload(tb, sc, d, size), b, r)
		res.Run = run
		results = append(results, res)
		if err != nil {
			res.Error = err.Error()
			errs = append(errs, fmt.Errorf("%s, %d MiB, run %d: %w", sc, size>>20, run, err))
		}
		log.Info("scenario done", "scenario", sc, "mib", size>>20, "run", run, "ok", fmt.Sprintf("%d/%d", res.OK, res.Asked),
			"p50", round(res.P50), "p99", round(res.P99), "max", round(res.Max), "upstream", round(res.UpstreamLink),
			"agent_cpu_s_per_gib", round(res.AgentCPUPerGiB))
	}
	if slices.Contains(cfg.scenarios, scenarioDirect) {
		runOne(scenarioDirect, directSize(cfg, n), 1)
	}
	for _, size := range cfg.sizes {
		if why := skipCell(cfg, n, size, freeDisk(tb.Dir())); why != "" {
			log.Warn("cell skipped", "mib", size>>20, "why", why)
			results = append(results, &result{Nodes: n, NodeRate: b.String(), RegistryRate: r.String(), Size: size, Skipped: why})
			continue
		}
		for run := 1; run <= cfg.runs && ctx.Err() == nil; run++ {
			for _, sc := range cfg.scenarios {
				if (sc == scenarioCold || sc == scenarioWarm) && ctx.Err() == nil {
					runOne(sc, size, run)
				}
			}
		}
	}
	if err := benchImages(ctx, log, cfg, tb, swarm, b, r, &results); err != nil {
		errs = append(errs, err)
	}
	return results, errors.Join(errs...)
}

// skipCell says why N nodes should not fetch a blob of size bytes (their stores would hold
// N × size), or "" when they may: -max-cell-gib, or 70 % of the free disk (free, 0 if unknown).
func skipCell(cfg config, n int, size, free int64) string {
	need := int64(n) * size
	switch {
	case cfg.maxCellBytes > 0 && need > cfg.maxCellBytes:
		return fmt.Sprintf("%d nodes × %d MiB is more than -max-cell-gib %d", n, size>>20, cfg.maxCellBytes>>30)
	case cfg.maxCellBytes == 0 && free > 0 && need > free*7/10:
		return fmt.Sprintf("%d nodes × %d MiB need %d GiB of disk, %d GiB free", n, size>>20, need>>30, free>>30)
	}
	return ""
}

// freeDisk is the space free for unprivileged use on dir's filesystem (0 if unknown).
func freeDisk(dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

// workload is what the nodes fetch in a scenario, and how.
type workload struct {
	size    int64     // bytes each node fetches (S)
	digests []v1.Hash // the blobs, whose bytes in the registry's log count as upstream
	// seedFirst makes node 0 hold the content before the others ask (warm).
	seedFirst func(ctx context.Context, timeout time.Duration) error
	// fetch has nodes from first on fetch at start; it returns one result per node.
	fetch func(ctx context.Context, first int, start time.Time, timeout time.Duration) ([]testbed.FetchResult, error)
	// direct, if set, prepares the nodes to fetch from the registry without agents, and
	// returns what undoes it.
	direct func() (undo func(), err error)
	// floor, if set, runs after the measurements and returns the seconds node 0 needs to take
	// the content in again alone, its bytes local (see image.go).
	floor func(ctx context.Context) (float64, error)
}

// blobWorkload has the nodes GET blob d of size bytes from their agents' mirrors (from the
// registry in direct) with the fetch client.
func blobWorkload(tb *testbed.Testbed, sc string, d v1.Hash, size int64) workload {
	url := func(i int) string { return tb.Node(i).MirrorBlobURL(repo, d.String()) }
	if sc == scenarioDirect {
		url = func(int) string { return tb.RegistryBlobURL(repo, d) }
	}
	return workload{
		size: size, digests: []v1.Hash{d},
		seedFirst: func(ctx context.Context, timeout time.Duration) error {
			seed, err := tb.Node(0).Fetch(ctx, testbed.FetchSpec{URL: url(0), Digest: d, Timeout: timeout})
			if err != nil {
				return err
			}
			if !seed.OK {
				return fmt.Errorf("node 0 could not fetch the blob first: %s", seed.Error)
			}
			return nil
		},
		fetch: func(ctx context.Context, first int, start time.Time, timeout time.Duration) ([]testbed.FetchResult, error) {
			return tb.FetchAll(ctx, func(i int) *testbed.FetchSpec {
				if i < first {
					return nil
				}
				return &testbed.FetchSpec{URL: url(i), Digest: d, Start: start, Timeout: timeout}
			})
		},
	}
}

func runScenario(ctx context.Context, log *slog.Logger, cfg config, tb *testbed.Testbed, sc string, swarm bool,
	w workload, b, r testbed.Rate) (*result, error) {
	wallStart := time.Now()
	n := len(tb.Nodes())
	size := w.size
	direct := sc == scenarioDirect || sc == scenarioImageDirect
	res := &result{
		Nodes: n, NodeRate: b.String(), RegistryRate: r.String(), Scenario: sc, Swarm: swarm && !direct,
		Size: size, SOverB: float64(size) / b.BytesPerSecond(),
	}
	// Worst case is every node fetching from the registry on its own: N·S/R.
	timeout := 3*time.Duration(math.Max(float64(n)*float64(size)/r.BytesPerSecond(), res.SOverB)*float64(time.Second)) + time.Minute

	if !direct {
		if err := startAgents(ctx, tb, swarm, cfg.agentArgs); err != nil {
			return res, err
		}
		defer stopAgents(tb, log, !cfg.keep)
	} else if w.direct != nil {
		undo, err := w.direct()
		if err != nil {
			return res, err
		}
		defer undo()
	}
	if err := tb.Registry().Sync(ctx); err != nil {
		return res, err
	}
	logBefore, err := tb.Registry().Requests()
	if err != nil {
		return res, err
	}
	linkBefore, err := tb.RegistryTraffic()
	if err != nil {
		return res, err
	}

	first := 0
	if sc == scenarioWarm || sc == scenarioImageWarm {
		if err := w.seedFirst(ctx, timeout); err != nil {
			return res, err
		}
		first = 1
	}

	start := time.Now().Add(cfg.startDelay + time.Duration(n)*20*time.Millisecond)
	// Every CPU figure is read at the common start: the seconds of waiting for it would
	// otherwise dilute a short transfer's machine CPU, and what the agents spend idle is not
	// the transfer's.
	type cpuAt struct {
		machine    testbed.MachineCPU
		procs      float64
		agents     []float64
		containerd float64
		err        error
	}
	atStart := make(chan cpuAt, 1)
	go func() {
		time.Sleep(time.Until(start))
		var at cpuAt
		var errs [4]error
		at.machine, errs[0] = testbed.ReadMachineCPU()
		at.procs, errs[1] = processCPU(tb)
		at.agents, errs[2] = agentCPUs(tb)
		at.containerd, errs[3] = containerdCPU(tb)
		at.err = errors.Join(errs[:]...)
		atStart <- at
	}()
	stopSampling := make(chan struct{})
	sampled := make(chan []second, 1)
	go func() { sampled <- sample(tb, start, stopSampling) }()
	if cfg.profileSeconds > 0 && !direct {
		// Deferred after stopAgents, so it runs first: the profiles end before the agents do.
		waitProfiles := profileAgents(ctx, tb, sc, start, cfg.profileSeconds)
		defer func() {
			if err := waitProfiles(); err != nil {
				log.Warn("cpu profiles", "err", err)
			}
		}()
	}
	fetches, err := w.fetch(ctx, first, start, timeout)
	close(stopSampling)
	res.Timeline = <-sampled
	if ctx.Err() != nil {
		return res, fmt.Errorf("interrupted: %w", ctx.Err())
	}
	cpuAfter, cpuErr := testbed.ReadMachineCPU()
	if err = errors.Join(err, cpuErr); err != nil {
		return res, err
	}
	before := <-atStart
	if before.err != nil {
		return res, before.err
	}
	cpu := cpuAfter.Sub(before.machine)
	res.MachineCPU, res.MachineBusy, res.MachineSteal = cpu.Utilisation(), cpu.Busy, cpu.StealShare()
	procsAfter, err := processCPU(tb)
	if err != nil {
		return res, err
	}
	agentsAfter, err := agentCPUs(tb)
	if err != nil {
		return res, err
	}
	containerdAfter, err := containerdCPU(tb)
	if err != nil {
		return res, err
	}
	agentsBefore := before.agents
	res.ContainerdCPUSum = containerdAfter - before.containerd
	res.TestbedCPU = procsAfter - before.procs
	for _, f := range fetches {
		res.TestbedCPU += f.CPUSeconds
	}
	if cpu.Total > 0 {
		res.TestbedCPUShare = res.TestbedCPU / cpu.Total
	}

	var times []float64
	for _, f := range fetches[first:] {
		res.Asked++
		res.Fetches = append(res.Fetches, f)
		if f.OK {
			res.OK++
			times = append(times, f.Seconds/res.SOverB)
		}
	}
	slices.Sort(times)
	res.P50, res.P99 = percentile(times, 0.50), percentile(times, 0.99)
	if len(times) > 0 {
		res.Max = times[len(times)-1]
	}
	res.LinkUse = linkShare(res.Timeline, first, res.Max*res.SOverB, b)

	if err := tb.Registry().Sync(ctx); err != nil {
		return res, err
	}
	linkAfter, err := tb.RegistryTraffic()
	if err != nil {
		return res, err
	}
	res.UpstreamLink = float64(linkAfter.Sub(linkBefore).Sent) / float64(size)
	logAfter, err := tb.Registry().Requests()
	if err != nil {
		return res, err
	}
	sent := harness.BlobBytes(logAfter[min(len(logBefore), len(logAfter)):])
	for _, d := range w.digests {
		res.UpstreamLog += float64(sent[d]) / float64(size)
	}

	if !direct {
		for i, node := range tb.Nodes() {
			u, err := node.AgentUsage()
			if err != nil {
				return res, err
			}
			used := agentsAfter[i] - agentsBefore[i]
			res.AgentCPUSum += used
			res.AgentCPUMax = max(res.AgentCPUMax, used)
			res.PeakRSSMax = max(res.PeakRSSMax, u.PeakRSS)
		}
		if delivered := float64(res.Asked) * float64(size) / (1 << 30); delivered > 0 {
			res.AgentCPUPerGiB = res.AgentCPUSum / delivered
		}
	}
	if w.floor != nil && res.OK == res.Asked && ctx.Err() == nil {
		if res.FloorSeconds, err = w.floor(ctx); err != nil {
			return res, fmt.Errorf("unpack floor: %w", err)
		}
	}
	res.Wall = time.Since(wallStart).Seconds()
	if res.OK < res.Asked {
		return res, fmt.Errorf("%d of %d nodes failed, e.g. %s", res.Asked-res.OK, res.Asked, firstError(res.Fetches))
	}
	return res, nil
}

// profileAgents fetches a CPU profile of the given seconds from every node's agent from start
// on, over its metrics address (the agents run with --pprof), into the testbed directory as
// <scenario>-<node>.pprof. The returned function waits for them all. Merge them with
// go tool pprof -proto <files> > all.pb.gz.
func profileAgents(ctx context.Context, tb *testbed.Testbed, scenario string, start time.Time, seconds int) func() error {
	var wg sync.WaitGroup
	errs := make([]error, len(tb.Nodes()))
	for i, node := range tb.Nodes() {
		wg.Go(func() {
			path := filepath.Join(tb.Dir(), scenario+"-"+node.Name()+".pprof")
			if err := profileAgent(ctx, node, path, start, seconds); err != nil {
				errs[i] = fmt.Errorf("node %s: %w", node.Name(), err)
			}
		})
	}
	return func() error {
		wg.Wait()
		return errors.Join(errs...)
	}
}

func profileAgent(ctx context.Context, node *testbed.Node, path string, start time.Time, seconds int) error {
	select {
	case <-time.After(time.Until(start)):
	case <-ctx.Done():
		return ctx.Err()
	}
	agent := node.Agent()
	if agent == nil {
		return errors.New("no agent")
	}
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", agent.MetricsAddr(), seconds)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: time.Duration(seconds)*time.Second + time.Minute}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("fetch cpu profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(msg))
	}
	profile, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("fetch cpu profile: %w", err)
	}
	return os.WriteFile(path, profile, 0o644)
}

// sample reads every node link's counters and the machine's CPU counters each second from
// start until stop closes, and returns what each second saw.
func sample(tb *testbed.Testbed, start time.Time, stop <-chan struct{}) []second {
	select {
	case <-time.After(time.Until(start)):
	case <-stop:
		return nil
	}
	read := func() ([]testbed.Traffic, testbed.MachineCPU, error) {
		links, err := tb.NodeTraffic()
		if err != nil {
			return nil, testbed.MachineCPU{}, err
		}
		cpu, err := testbed.ReadMachineCPU()
		return links, cpu, err
	}
	prevLinks, prevCPU, err := read()
	if err != nil {
		return nil
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var timeline []second
	for {
		select {
		case <-tick.C:
		case <-stop:
			return timeline
		}
		links, cpu, err := read()
		if err != nil {
			return timeline
		}
		sec := second{Links: make([]testbed.Traffic, len(links)), MachineCPU: cpu.Sub(prevCPU).Utilisation()}
		for i := range links {
			sec.Links[i] = links[i].Sub(prevLinks[i])
		}
		timeline, prevLinks, prevCPU = append(timeline, sec), links, cpu
	}
}

// linkShare is the share of the asking nodes' (from index first) link capacity used in the
// first seconds of the timeline, down and up.
func linkShare(timeline []second, first int, seconds float64, b testbed.Rate) Traffic {
	whole := min(len(timeline), int(math.Ceil(seconds)))
	if whole == 0 {
		return Traffic{}
	}
	var down, up int64
	nodes := 0
	for _, sec := range timeline[:whole] {
		nodes = len(sec.Links) - first
		for _, tr := range sec.Links[first:] {
			down += tr.Received
			up += tr.Sent
		}
	}
	capacity := float64(nodes) * b.BytesPerSecond() * float64(whole)
	return Traffic{Down: float64(down) / capacity, Up: float64(up) / capacity}
}

// processCPU is the CPU time the registry and the running agents have used so far.
func processCPU(tb *testbed.Testbed) (float64, error) {
	u, err := testbed.ProcessUsage(tb.Registry().PID())
	if err != nil {
		return 0, err
	}
	total := u.CPUSeconds
	for _, node := range tb.Nodes() {
		if node.Agent() == nil {
			continue
		}
		u, err := node.AgentUsage()
		if err != nil {
			return 0, err
		}
		total += u.CPUSeconds
	}
	return total, nil
}

func startAgents(ctx context.Context, tb *testbed.Testbed, swarm bool, extra []string) error {
	errs := make([]error, len(tb.Nodes()))
	done := make(chan struct{})
	for i, node := range tb.Nodes() {
		go func() {
			defer func() { done <- struct{}{} }()
			var args []string
			if swarm {
				args = node.SwarmArgs()
			}
			_, errs[i] = node.StartAgent(ctx, append(args, extra...)...)
		}()
	}
	for range tb.Nodes() {
		<-done
	}
	if err := errors.Join(errs...); err != nil || !swarm {
		return err
	}
	return tb.WaitForSwarm(ctx, time.Minute)
}

// stopAgents stops every node's agent and, with removeData, deletes its store: a grid of runs
// would otherwise keep every run's copies on disk.
func stopAgents(tb *testbed.Testbed, log *slog.Logger, removeData bool) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, node := range tb.Nodes() {
		if err := node.StopAgent(ctx); err != nil {
			log.Warn("stop agent", "node", node.Name(), "err", err)
			continue
		}
		if a := node.Agent(); removeData && a != nil {
			if err := os.RemoveAll(a.DataDir()); err != nil {
				log.Warn("remove agent data", "node", node.Name(), "err", err)
			}
		}
	}
}

// containerdCPU is the CPU time all nodes' containerd have used so far (0 without any).
func containerdCPU(tb *testbed.Testbed) (float64, error) {
	var total float64
	for _, node := range tb.Nodes() {
		if node.Containerd() == nil {
			continue
		}
		u, err := testbed.ProcessUsage(node.Containerd().PID())
		if err != nil {
			return 0, err
		}
		total += u.CPUSeconds
	}
	return total, nil
}

// agentCPUs is the CPU time each node's agent has used so far (0 for a node without one).
func agentCPUs(tb *testbed.Testbed) ([]float64, error) {
	out := make([]float64, len(tb.Nodes()))
	for i, node := range tb.Nodes() {
		if node.Agent() == nil {
			continue
		}
		u, err := node.AgentUsage()
		if err != nil {
			return nil, err
		}
		out[i] = u.CPUSeconds
	}
	return out, nil
}

// percentile is the nearest-rank percentile of sorted values (0 when there are none).
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func firstError(fs []testbed.FetchResult) string {
	for _, f := range fs {
		if !f.OK {
			return f.Node + ": " + f.Error
		}
	}
	return ""
}

func round(v float64) float64 { return math.Round(v*100) / 100 }

func printTable(w io.Writer, results []*result) {
	fmt.Fprintf(w, "\n%-4s %-8s %-8s %-6s %-3s %-7s %-6s %6s %6s %6s %8s %6s %10s %13s %9s %7s %13s %7s\n",
		"N", "B", "R", "scen.", "run", "S", "ok", "p50", "p99", "max", "upstr/S", "(log)", "links d/u", "agentCPU s", "CPU-s/GiB", "RSS MiB", "machine CPU", "wall s")
	for _, r := range results {
		if r.Skipped != "" {
			fmt.Fprintf(w, "%-4d %-8s %-8s skipped %-7s %s\n", r.Nodes, r.NodeRate, r.RegistryRate, mib(r.Size), r.Skipped)
			continue
		}
		fmt.Fprintf(w, "%-4d %-8s %-8s %-6s %-3d %-7s %-6s %6.2f %6.2f %6.2f %8.2f %6.2f %10s %13s %9s %7s %13s %7.0f\n",
			r.Nodes, r.NodeRate, r.RegistryRate, r.Scenario, r.Run, mib(r.Size), fmt.Sprintf("%d/%d", r.OK, r.Asked),
			r.P50, r.P99, r.Max, r.UpstreamLink, r.UpstreamLog, linkUse(r), agentCPU(r), cpuPerGiB(r), rss(r), machineCPU(r), r.Wall)
	}
	fmt.Fprintln(w, "times in units of S/B (S: blob size, B: node link rate); upstream: registry link bytes sent / S (log: blob bytes in the registry's access log / S);")
	fmt.Fprintln(w, "links d/u: share of the asking nodes' link capacity used down / up until the last one finished;")
	fmt.Fprintln(w, "agent CPU: all agents' CPU time from the common start to the last completion (sum / max), and per GiB delivered to the asking nodes;")
	fmt.Fprintln(w, "machine CPU: share of all cores busy while the nodes fetched (in brackets: the testbed's processes alone; steal: time the hypervisor gave these cores to other machines)")
	if sum := summarise(results); len(sum) > 0 {
		fmt.Fprintf(w, "\nmedian of runs: %-4s %-7s %-6s %-5s %-18s %-6s %9s %13s %s\n", "N", "S", "scen.", "runs", "p99 (range)", "goal", "upstr/S", "CPU-s/GiB", "machine CPU")
		for _, c := range sum {
			fmt.Fprintf(w, "                %-4d %-7s %-6s %-5d %-18s %-6.2f %9.2f %13.1f %.0f%%  %s\n", c.nodes, mib(c.size), c.scenario, c.runs,
				fmt.Sprintf("%.2f (%.2f-%.2f)", c.p99, c.p99Min, c.p99Max), c.goal, c.upstream, c.cpuPerGiB, 100*c.machineCPU, c.sizeCell())
		}
	}
}

// cell is the summary of the runs of one scenario at one (N, S).
type cell struct {
	nodes                 int
	nodeRate              string
	size                  int64
	scenario              string
	runs                  int
	p99, p99Min, p99Max   float64 // median, lowest, highest
	goal                  float64 // p99 goal, in units of S/B
	floor                 float64 // image scenarios: median unpack floor, seconds
	layers                int
	upstream              float64 // median registry link bytes / S
	cpuPerGiB, machineCPU float64 // medians
	peakRSS               int64   // highest
}

// goal is the p99 goal in units of S/B for a blob whose S/B is sOverB seconds: 1.25 × S/B, or
// S/B + 1 s when that is more (small blobs, whose start-up cannot be amortised).
func goal(sOverB float64) float64 {
	if sOverB <= 0 {
		return 1.25
	}
	return max(1.25, 1+1/sOverB)
}

// summarise gives the median run of every swarm scenario at every (N, S), in the order the
// cells first appear.
func summarise(results []*result) []cell {
	type key struct {
		n        int
		size     int64
		scenario string
	}
	var order []key
	groups := map[key][]*result{}
	for _, r := range results {
		if r.Skipped != "" || isDirect(r.Scenario) || r.Error != "" {
			continue
		}
		k := key{r.Nodes, r.Size, r.Scenario}
		if isImage(r.Scenario) {
			k.size = 0 // each run's image is a new one, a few KiB larger or smaller
		}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], r)
	}
	var cells []cell
	for _, k := range order {
		rs := groups[k]
		field := func(f func(*result) float64) []float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			slices.Sort(v)
			return v
		}
		p99 := field(func(r *result) float64 { return r.P99 })
		c := cell{nodes: k.n, nodeRate: rs[0].NodeRate, size: rs[0].Size, scenario: k.scenario, runs: len(rs),
			p99: median(p99), p99Min: p99[0], p99Max: p99[len(p99)-1], goal: goal(rs[0].SOverB), layers: rs[0].Layers,
			upstream:   median(field(func(r *result) float64 { return r.UpstreamLink })),
			cpuPerGiB:  median(field(func(r *result) float64 { return r.AgentCPUPerGiB })),
			machineCPU: median(field(func(r *result) float64 { return r.MachineCPU })),
		}
		for _, r := range rs {
			c.peakRSS = max(c.peakRSS, r.PeakRSSMax)
		}
		if isImage(k.scenario) {
			// An image is judged against its bytes at B plus what containerd needs alone.
			c.floor = median(field(func(r *result) float64 { return r.FloorSeconds }))
			c.goal = 1.25 + c.floor/rs[0].SOverB
		}
		cells = append(cells, c)
	}
	return cells
}

// sizeCell is the cell's S as the summary shows it: an image's also says its layers and
// unpack floor.
func (c cell) sizeCell() string {
	if c.layers == 0 {
		return fmt.Sprintf("%d MiB", c.size>>20)
	}
	return fmt.Sprintf("%.0f MiB image, %d layers, unpack floor %.1f s", float64(c.size)/(1<<20), c.layers, c.floor)
}

// median of sorted values (0 when there are none).
func median(sorted []float64) float64 {
	switch n := len(sorted); {
	case n == 0:
		return 0
	case n%2 == 1:
		return sorted[n/2]
	default:
		return (sorted[n/2-1] + sorted[n/2]) / 2
	}
}

func cpuPerGiB(r *result) string {
	if isDirect(r.Scenario) {
		return "–"
	}
	return fmt.Sprintf("%.1f", r.AgentCPUPerGiB)
}

func linkUse(r *result) string {
	return fmt.Sprintf("%.0f/%.0f%%", 100*r.LinkUse.Down, 100*r.LinkUse.Up)
}

func machineCPU(r *result) string {
	if r.MachineSteal >= 0.01 {
		return fmt.Sprintf("%.0f%% (%.0f%%; steal %.0f%%)", 100*r.MachineCPU, 100*r.TestbedCPUShare, 100*r.MachineSteal)
	}
	return fmt.Sprintf("%.0f%% (%.0f%%)", 100*r.MachineCPU, 100*r.TestbedCPUShare)
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return strconv.Itoa(n) + " " + what + "s"
}

func mib(n int64) string { return strconv.FormatInt(n>>20, 10) + "Mi" }

func agentCPU(r *result) string {
	if isDirect(r.Scenario) {
		return "–"
	}
	return fmt.Sprintf("%.1f / %.1f", r.AgentCPUSum, r.AgentCPUMax)
}

func rss(r *result) string {
	if isDirect(r.Scenario) {
		return "–"
	}
	return strconv.FormatInt(r.PeakRSSMax>>20, 10)
}

func writeJSON(path string, results []*result) error {
	data, err := json.MarshalIndent(results, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// markdown renders the section that goes between the markers, for a run of this process.
func markdown(cfg config, swarm bool, results []*result) string {
	return markdownAt(cfg, swarm, results, time.Now(), os.Args[1:])
}

// markdownAt renders the section of a run made on date with args.
func markdownAt(cfg config, swarm bool, results []*result, date time.Time, args []string) string {
	var b strings.Builder
	mode := "on (`--p2p-addr`, `--peers`)"
	switch {
	case !swarm && cfg.swarm == "off":
		mode = "off (`-swarm off`): every agent fetches from the registry on its own"
	case !swarm:
		mode = "off: this agent has no swarm flags, so every agent fetches from the registry on its own"
	}
	fmt.Fprintf(&b, "Measured %s with `%s`; swarm %s.\n\n",
		date.UTC().Format("2006-01-02"), strings.Join(append([]string{"go run ./hack/swarmbench"}, args...), " "), mode)
	var failed []string
	for _, r := range results {
		if r.Error != "" {
			failed = append(failed, fmt.Sprintf("N = %d %s run %d", r.Nodes, r.Scenario, r.Run))
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(&b, "Runs that failed, left out of the medians (their errors are in the `-json` output): %s.\n\n", strings.Join(failed, ", "))
	}
	if cells := summarise(results); len(cells) > 0 {
		fmt.Fprintf(&b, "The median of %s per cell (p99 in units of S/B; the goal is p99 ≤ 1.25 × S/B, or S/B + 1 s when that is more; for an image, 1.25 × S/B plus the unpack floor):\n\n", plural(cfg.runs, "run"))
		b.WriteString("| N | B | S | scenario | p99 (lowest-highest) | goal | met | upstream / S | agent CPU-s per GiB | machine CPU | agent peak RSS |\n")
		b.WriteString("| ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n")
		for _, c := range cells {
			met := "yes"
			if c.p99 > c.goal {
				met = "**no**"
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %.2f (%.2f-%.2f) | %.2f | %s | %.2f | %.1f | %.0f %% | %d MiB |\n",
				c.nodes, c.nodeRate, c.sizeCell(), c.scenario, c.p99, c.p99Min, c.p99Max, c.goal, met, c.upstream, c.cpuPerGiB, 100*c.machineCPU, c.peakRSS>>20)
		}
		for _, r := range results {
			if r.Skipped != "" {
				fmt.Fprintf(&b, "| %d | %s | %d MiB | – | skipped: %s | | | | | | |\n", r.Nodes, r.NodeRate, r.Size>>20, r.Skipped)
			}
		}
		b.WriteString("\nEvery run:\n\n")
	}
	b.WriteString("| N | B | R | scenario | run | S | nodes ok | p50 | p99 | max | upstream / S (link, log) | links down / up | agent CPU s (sum / max) | agent CPU-s per GiB | agent peak RSS (max) | machine CPU (testbed) | wall |\n")
	b.WriteString("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for _, r := range results {
		if r.Skipped != "" {
			continue
		}
		rssCell := "–"
		if !isDirect(r.Scenario) {
			rssCell = fmt.Sprintf("%d MiB", r.PeakRSSMax>>20)
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %d | %d MiB | %d/%d | %.2f | %.2f | %.2f | %.2f, %.2f | %s | %s | %s | %s | %s | %.0f s |\n",
			r.Nodes, r.NodeRate, r.RegistryRate, r.Scenario, r.Run, r.Size>>20, r.OK, r.Asked,
			r.P50, r.P99, r.Max, r.UpstreamLink, r.UpstreamLog, linkUse(r), agentCPU(r), cpuPerGiB(r), rssCell, machineCPU(r), r.Wall)
	}
	b.WriteString("\nTimes are per-node completion (common start to the last verified byte) in units of S/B. ")
	b.WriteString("Upstream is what the registry sent during the scenario over S, counted on its link (with headers) and as blob bytes in its access log; for warm it includes node 0's first fetch. ")
	b.WriteString("Agent CPU is every agent's CPU time from the common start to the last node's completion (not their start-up, nor node 0's first fetch in warm), summed and the busiest one's, and the sum per GiB delivered to the asking nodes (uploads to peers included). ")
	b.WriteString("Links is the share of the asking nodes' link capacity that carried bytes, down and up, from the start until the last node finished (`-json` has it second by second, with each node's delivery curve). ")
	b.WriteString("Machine CPU is the share of both cores busy while the nodes fetched, whatever ran; in brackets the share used by ")
	b.WriteString("the testbed's own processes (agents, registry, fetch clients; the kernel's network work is not in it), and, when there was any, the steal: ")
	b.WriteString("time the hypervisor gave these cores to other machines while this one had work. A run with much steal was slowed by something outside it.\n")
	return b.String()
}

const (
	// sectionIntro goes before the swarm section's markers when the file has none yet.
	sectionIntro = `
## Swarm: N nodes ask for the same new blob at once

Reproduce with ` + "`make bench`" + ` or ` + "`go run ./hack/swarmbench`" + ` (root; see ` + "`-h`" + ` for N, S, B and
the scenarios). Each node is a network namespace on a bridge inside a namespace with no route out,
its link shaped to B with tc tbf both ways, the registry's to R = 4·B. Scenarios,
each with fresh agents: **direct** (every node GETs the blob from the registry: the baseline; a
smaller blob at large N), **cold** (every node asks its own agent at the same moment, nobody holds
the blob), **warm** (node 0 fetched it through its agent first; the other N−1 ask at once).
The physical limit is 1 × S/B per node and 1 × S upstream.

`
)

// writeDoc replaces what is between the markers of section in path, adding the section at the
// end when the markers are missing, and leaves the rest of the file as it was.
func writeDoc(path, section, body string) error {
	beginMarker, endMarker := "<!-- BEGIN "+section+" -->", "<!-- END "+section+" -->"
	intro := sectionIntro
	if section != "swarm" {
		intro = "\n## Swarm benchmark: " + section + "\n\n"
	}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	text := string(data)
	begin, end := strings.Index(text, beginMarker), strings.Index(text, endMarker)
	switch {
	case begin < 0 && end < 0:
		text = strings.TrimLeft(strings.TrimRight(text, "\n")+"\n"+intro, "\n") + beginMarker + "\n" + body + endMarker + "\n"
	case begin < 0 || end < begin:
		return fmt.Errorf("%s: %s markers out of order", path, section)
	default:
		text = text[:begin+len(beginMarker)] + "\n" + body + text[end:]
	}
	return os.WriteFile(path, []byte(text), 0o644)
}
