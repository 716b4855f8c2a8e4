// Package agent assembles the node agent: the content store, the upstream client, the registry
// mirror containerd talks to, the hosts.toml that points containerd at it, and the metrics and
// health endpoints. Each part lives in its own package; this one only wires them and runs them.
package agent

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-dev/shoal/agent/hostconfig"
	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/mirror"
	"github.com/shoal-dev/shoal/agent/peerport"
	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/swarm"
	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/oci"
)

// Config is everything `shoal agent` is told on its command line.
type Config struct {
	// MirrorAddr is where containerd reaches the mirror (loopback in production).
	MirrorAddr string
	// DataDir holds the content store.
	DataDir string
	// CacheSize limits the store in bytes; 0 means unlimited.
	CacheSize int64
	// ContainerdHostsDir is containerd's config_path; "" means hosts.toml is not written.
	ContainerdHostsDir string
	// ContainerdHostsDirOnHost is the same directory as containerd names it, when the agent
	// sees it elsewhere (a container with the node's directory mounted); "" = ContainerdHostsDir.
	ContainerdHostsDirOnHost string
	// ContainerdConfig is containerd's config.toml, checked for config_path; "" skips the check.
	ContainerdConfig string
	// MirrorRegistries are the registries containerd is pointed at the mirror for; "*" is all.
	MirrorRegistries []string
	// RegistryEndpoints overrides where a registry is really served: registry → URL.
	RegistryEndpoints map[string]string
	// RegistryAuthFile is a docker config.json with credentials for upstream registries.
	RegistryAuthFile string
	// Keychains are further sources of upstream credentials, asked before RegistryAuthFile
	// (in Kubernetes: the controller's pull tokens, agent/kubecreds). One that is a
	// prometheus.Collector is registered on the agent's /metrics.
	Keychains []authn.Keychain
	// RegistryCAFile is a PEM bundle of CAs trusted for every upstream registry besides the
	// system roots. A registry's own TLS settings come from its existing hosts.toml.
	RegistryCAFile string
	// MetricsAddr serves /metrics, /healthz and /readyz (and /debug/pprof/ with Pprof); ""
	// disables it.
	MetricsAddr string
	// DefaultRegistry serves requests that carry no ?ns= (clients other than containerd).
	DefaultRegistry string
	// MirrorDialTimeout is the dial_timeout written into hosts.toml for the mirror host.
	MirrorDialTimeout time.Duration
	// HostsRecheck is how often the hosts.toml files are checked, to write them again when
	// something else rewrote them; 0 = DefaultHostsRecheck.
	HostsRecheck time.Duration
	// ManifestTimeout bounds resolving a manifest upstream.
	ManifestTimeout time.Duration
	// FirstByteTimeout bounds the mirror's time to the first byte of an answer (503 past it);
	// BodyIdleTimeout cuts a body that goes silent. 0 = the mirror's defaults, negative = none.
	FirstByteTimeout, BodyIdleTimeout time.Duration
	// FaultInjection serves the fault hooks on the metrics address (see faults.go).
	FaultInjection bool
	// Pprof serves net/http/pprof's profiles under /debug/pprof/ on the metrics address.
	Pprof bool
	// UpstreamTimeouts bound the upstream client's connections and reads.
	UpstreamTimeouts upstream.Timeouts
	// Swarm configures peer-to-peer distribution; disabled when P2PAddr is not set.
	Swarm SwarmConfig
	// NodeCache, when set, makes the store hold what this node is asked to hold (in
	// Kubernetes: its NodeCache object, agent/nodecache). It is called once the agent's parts
	// are up, with the parts through which a pull's bytes come, and returns when ctx ends. It
	// runs beside the mirror and stops before the swarm and the store; an error stops the agent.
	NodeCache func(ctx context.Context, content Content) error
	// Logger receives structured logs.
	Logger *slog.Logger
}

// SwarmConfig is the peer-to-peer part of the agent's configuration.
type SwarmConfig struct {
	// P2PAddr is where peers reach this node, and where it listens; invalid = no swarm.
	P2PAddr netip.AddrPort
	// Peers is the static member list (the same on every node; may include this node). With
	// Discovery, it is only where the members start.
	Peers []netip.AddrPort
	// Discovery, when set, keeps the member list up to date while the agent runs (in
	// Kubernetes: the SwarmMembers, agent/kubemembers): it calls set with every new list and
	// returns when ctx ends. It runs beside the swarm and stops with it; an error stops the
	// agent.
	Discovery func(ctx context.Context, set func([]netip.AddrPort)) error
	// Seeds, when set, learns which blobs pods are about to pull (in Kubernetes: SwarmSeeds,
	// agent/kubeseeds) and calls prefetch for each, which fetches the segments this node seeds
	// of a blob of a mirrored registry (swarm.Swarm.Prefetch). It runs beside the swarm and stops
	// with it; an error stops the agent. Its metrics go to reg, the agent's registry.
	Seeds func(ctx context.Context, prefetch Prefetch, reg prometheus.Registerer) error
	// SegmentSize and PieceLength cut blobs into torrents; the same on every node.
	SegmentSize, PieceLength int64
	// RampSegments is how many short segments start a blob; the same on every node. 0 =
	// swarm.DefaultRampSegments, negative = none.
	RampSegments int
	// MinSegments is how many segments a blob is cut into at least (see swarm.Config); the same
	// on every node. 0 = segments of SegmentSize for every blob.
	MinSegments int
	// MaxUploadRate and MaxDownloadRate cap peer traffic in bytes per second; 0 = unlimited.
	MaxUploadRate, MaxDownloadRate int64
	// IdleTimeout is how long a blob without readers keeps seeding after its last transfer, and
	// how long an unused working file is kept; 0 = swarm.DefaultIdleTimeout.
	IdleTimeout time.Duration
	// DataPath is how pieces move between agents: swarm.DataPathTorrent ("" too) or
	// swarm.DataPathPieces; the same on every node.
	DataPath string
}

// Prefetch fetches ahead of readers the segments of blob d (size bytes, in repo of registry)
// that this node seeds, and returns how many it seeds.
type Prefetch func(ctx context.Context, registry, repo string, d v1.Hash, size int64) (int, error)

// Content is what the agent gives its NodeCache hook: the parts through which the bytes of a
// pull come, so that content fetched ahead of pulls comes exactly as a pull's would.
type Content struct {
	// Store is the content store, which verifies every blob it keeps.
	Store *store.Store
	// Upstream fetches manifests from registries, with the agent's endpoints, TLS settings and
	// credentials.
	Upstream *upstream.Client
	// BlobSource is where a blob missing from the store comes from, as for the mirror's
	// misses: the swarm with Swarm.P2PAddr, else the registry, whole. Seeders, when not empty,
	// are the only members that seed its segments (the nodes that are to hold it: see
	// swarm.SourceWithin).
	BlobSource func(registry, repo string, d v1.Hash, seeders []netip.AddrPort) store.Source
	// Mirrors reports whether the agent mirrors a registry (MirrorRegistries): content of
	// another registry reaches the node's runtime without the agent.
	Mirrors func(registry string) bool
	// Registerer registers metrics on the agent's /metrics.
	Registerer prometheus.Registerer
	// ContainerdFindings are what the preflight (CheckContainerd) found at start.
	ContainerdFindings []ContainerdFinding
}

// FieldError is a field of Config that the agent refuses, and why. Field is the field's Go
// name ("MirrorAddr", "Swarm.Peers"), for a command to name its own option for it.
type FieldError struct {
	Field string
	// Needs, when set, is another field that must be set for this one to mean anything.
	Needs string
	// Err says what is wrong with the field's value.
	Err error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

func (e *FieldError) Unwrap() error { return e.Err }

func fieldError(field string, err error) *FieldError { return &FieldError{Field: field, Err: err} }

// Validate checks the configuration and says what to fix. Its errors are *FieldError.
func (c *Config) Validate() error {
	if _, _, err := net.SplitHostPort(c.MirrorAddr); err != nil {
		return fieldError("MirrorAddr", fmt.Errorf("%q is not IP:PORT: %w", c.MirrorAddr, err))
	}
	if c.DataDir == "" {
		return fieldError("DataDir", errors.New("must be set"))
	}
	if c.CacheSize < 0 {
		return fieldError("CacheSize", errors.New("must not be negative"))
	}
	if len(c.MirrorRegistries) == 0 {
		return fieldError("MirrorRegistries", errors.New(`must name at least one registry, or "*"`))
	}
	for _, r := range c.MirrorRegistries {
		if r == "*" {
			continue
		}
		if err := oci.ValidateRegistry(r); err != nil {
			return fieldError("MirrorRegistries", err)
		}
	}
	for _, registry := range slices.Sorted(maps.Keys(c.RegistryEndpoints)) {
		endpoint := c.RegistryEndpoints[registry]
		if err := oci.ValidateRegistry(registry); err != nil {
			return fieldError("RegistryEndpoints", err)
		}
		if _, err := upstream.ParseEndpoint(endpoint); err != nil {
			return fieldError("RegistryEndpoints", fmt.Errorf("%s=%s: %w", registry, endpoint, err))
		}
	}
	if err := oci.ValidateRegistry(c.DefaultRegistry); err != nil {
		return fieldError("DefaultRegistry", err)
	}
	if len(c.Swarm.Peers) > 0 && !c.Swarm.P2PAddr.IsValid() {
		return &FieldError{Field: "Swarm.Peers", Needs: "Swarm.P2PAddr", Err: errors.New("needs Swarm.P2PAddr")}
	}
	if c.Swarm.Seeds != nil && !c.Swarm.P2PAddr.IsValid() {
		return &FieldError{Field: "Swarm.Seeds", Needs: "Swarm.P2PAddr", Err: errors.New("needs Swarm.P2PAddr")}
	}
	if c.Swarm.Discovery != nil && !c.Swarm.P2PAddr.IsValid() {
		return &FieldError{Field: "Swarm.Discovery", Needs: "Swarm.P2PAddr", Err: errors.New("needs Swarm.P2PAddr")}
	}
	if c.Swarm.MinSegments < 0 {
		return fieldError("Swarm.MinSegments", errors.New("must not be negative"))
	}
	if c.Swarm.MaxUploadRate < 0 {
		return fieldError("Swarm.MaxUploadRate", errors.New("must not be negative"))
	}
	if c.Swarm.MaxDownloadRate < 0 {
		return fieldError("Swarm.MaxDownloadRate", errors.New("must not be negative"))
	}
	switch c.Swarm.DataPath {
	case "", swarm.DataPathTorrent, swarm.DataPathPieces:
	default:
		return fieldError("Swarm.DataPath", fmt.Errorf("%q: want %q or %q", c.Swarm.DataPath, swarm.DataPathTorrent, swarm.DataPathPieces))
	}
	return nil
}

// Run starts the agent and blocks until ctx is cancelled or a part of it fails. Its parts run
// as one errgroup: when one fails, or ctx ends, the HTTP servers drain their requests (for at
// most shutdownGrace) and the NodeCache hook returns, then the swarm and the membership probes
// stop, and the content store is closed last. Run returns once every goroutine it started has ended and every listener is
// closed.
func Run(ctx context.Context, cfg Config) (err error) {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !cfg.mirrors(cfg.DefaultRegistry) {
		log.Warn("--default-registry is not mirrored: requests without ?ns= are refused with 404; add it to --mirror-registries",
			"default_registry", cfg.DefaultRegistry, "mirror_registries", cfg.MirrorRegistries)
	}
	rootCAs, err := readRootCAs(cfg.RegistryCAFile)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	blobs, err := store.Open(cfg.DataDir,
		store.WithMaxBytes(cfg.CacheSize),
		store.WithLogger(log), // the store names itself as the component
		store.WithRegisterer(reg))
	if err != nil {
		return fmt.Errorf("open content store in %s: %w", cfg.DataDir, err)
	}
	defer func() {
		if cerr := blobs.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close content store: %w", cerr))
		}
	}()
	usage, count := blobs.Usage()
	log.Info("content store ready", "dir", cfg.DataDir, "blobs", count, "bytes", usage, "limit", cfg.CacheSize)

	endpoints := newEndpointResolver(cfg)
	upstreamOpts := []upstream.Option{
		upstream.WithEndpointResolver(endpoints.resolve),
		upstream.WithTLSResolver(endpoints.tls),
		upstream.WithRootCAs(rootCAs...),
		upstream.WithLogger(log.With("component", "upstream")),
		upstream.WithRegisterer(reg),
		upstream.WithTimeouts(cfg.UpstreamTimeouts),
	}
	for _, kc := range cfg.Keychains {
		upstreamOpts = append(upstreamOpts, upstream.WithKeychain(kc))
		if c, ok := kc.(prometheus.Collector); ok {
			if err := reg.Register(c); err != nil {
				return fmt.Errorf("register the metrics of a keychain: %w", err)
			}
		}
	}
	if cfg.RegistryAuthFile != "" {
		upstreamOpts = append(upstreamOpts, upstream.WithAuthFile(cfg.RegistryAuthFile))
	}
	client := upstream.New(upstreamOpts...)
	for _, registry := range cfg.MirrorRegistries {
		if registry == "*" {
			continue
		}
		if err := client.Check(registry); err != nil {
			log.Warn("the agent cannot fetch from this registry; pulls from it bypass the agent", "registry", registry, "error", err)
		}
	}

	mirrorOpts := []mirror.Option{
		mirror.WithLogger(log.With("component", "mirror")),
		mirror.WithRegisterer(reg),
		mirror.WithDefaultRegistry(cfg.DefaultRegistry),
		mirror.WithAllowedRegistries(cfg.mirrors),
		mirror.WithManifestTimeout(cfg.ManifestTimeout),
	}
	if cfg.FirstByteTimeout != 0 {
		mirrorOpts = append(mirrorOpts, mirror.WithFirstByteTimeout(cfg.FirstByteTimeout))
	}
	if cfg.BodyIdleTimeout != 0 {
		mirrorOpts = append(mirrorOpts, mirror.WithBodyIdleTimeout(cfg.BodyIdleTimeout))
	}
	var faults *faultHooks
	var mirrorStore mirror.BlobStore = blobs
	if cfg.FaultInjection {
		faults = newFaultHooks(blobs, log)
		mirrorStore = faults
		log.Warn("fault injection is on: POST /debug/faults/wedge on the metrics address wedges the mirror's store")
	}
	health := newLiveness(log)
	health.add("content store", func() {
		if faults != nil {
			faults.wait()
		}
		blobs.Usage() // takes the store's lock
	})

	var servers []*namedServer
	defer func() {
		for _, s := range servers {
			_ = s.listener.Close() // those that never served; closing again does no harm
		}
	}()
	var p2p *p2pParts
	if cfg.Swarm.P2PAddr.IsValid() {
		if p2p, err = startSwarm(cfg, blobs, client, reg, log); err != nil {
			return err
		}
		// Closes the torrent client and the peer side of the p2p port, unless Run did.
		defer func() { _ = p2p.swarm.Close() }()
		servers = append(servers, p2p.control)
		mirrorOpts = append(mirrorOpts, mirror.WithBlobSource(p2p.swarm.Source))
		health.add("swarm", p2p.swarm.Check)
	}
	// The preflight reads containerd's configuration once, before hosts.toml is written.
	findings := CheckContainerd(cfg)
	var nodeCache func(context.Context) error
	if cfg.NodeCache != nil {
		content := Content{Store: blobs, Upstream: client, BlobSource: upstreamSource(client), Mirrors: cfg.mirrors, Registerer: reg,
			ContainerdFindings: findings}
		if p2p != nil {
			content.BlobSource = p2p.swarm.SourceWithin
		}
		nodeCache = func(ctx context.Context) error { return cfg.NodeCache(ctx, content) }
	}
	handler := mirror.New(mirrorStore, client, mirrorOpts...)

	// Listen before writing hosts.toml: containerd may read it the moment it appears.
	mirrorListener, err := net.Listen("tcp", cfg.MirrorAddr)
	if err != nil {
		return fmt.Errorf("listen for the mirror on %s: %w", cfg.MirrorAddr, err)
	}
	var ready atomic.Bool
	servers = append(servers, &namedServer{name: "mirror", listener: mirrorListener, server: &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}})
	if cfg.MetricsAddr != "" {
		metricsListener, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("listen for metrics on %s: %w", cfg.MetricsAddr, err)
		}
		servers = append(servers, &namedServer{name: "metrics", listener: metricsListener, server: &http.Server{
			Handler:           opsHandler(reg, &ready, health, faults, cfg.Pprof),
			ReadHeaderTimeout: 10 * time.Second,
		}})
	}

	if cfg.ContainerdHostsDir != "" {
		logFindings(findings, log)
		if err := writeHostsConfig(cfg, endpoints, log); err != nil {
			return err
		}
		rewrites := prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "hostconfig", Name: "rewrites_total",
			Help: "Times the agent found containerd's hosts.toml files changed under it (k3s and RKE2 rebuild their certs.d when they restart) and wrote its own again.",
		})
		reg.MustRegister(rewrites)
		nodeCache = alongside(nodeCache, func(ctx context.Context) error {
			keepHostsConfig(ctx, cfg, endpoints, rewrites, log)
			return nil
		})
	}
	ready.Store(true)
	log.Info("agent ready", "mirror", mirrorListener.Addr().String(), "registries", cfg.MirrorRegistries)
	err = runParts(ctx, servers, nodeCache, p2p, log)
	log.Info("agent stopped", "error", err)
	return err
}

// shutdownGrace bounds how long the HTTP servers wait for requests in flight when the agent
// stops; then their connections are cut, and containerd falls back to the registry.
const shutdownGrace = 5 * time.Second

// runParts runs the servers, the NodeCache hook, the swarm, the membership probes, discovery
// and the seeds hook until ctx ends or one of them fails, and returns once all have stopped:
// the servers and the NodeCache hook first, so that requests in flight can still read from the
// swarm while they drain.
func runParts(ctx context.Context, servers []*namedServer, nodeCache func(context.Context) error, p2p *p2pParts, log *slog.Logger) error {
	g, gctx := errgroup.WithContext(ctx)
	// The swarm and the probes stop once every server has drained (or failed).
	drainedCtx, drained := context.WithCancel(context.WithoutCancel(ctx))
	defer drained()
	var serving sync.WaitGroup
	for _, s := range servers {
		serving.Add(1)
		g.Go(func() error {
			defer serving.Done()
			return s.run(gctx)
		})
	}
	if nodeCache != nil {
		serving.Add(1)
		g.Go(func() error {
			defer serving.Done()
			if err := nodeCache(gctx); err != nil {
				return fmt.Errorf("node cache: %w", err)
			}
			return nil
		})
	}
	g.Go(func() error {
		serving.Wait()
		log.Info("agent stopping")
		drained()
		return nil
	})
	if p2p != nil {
		g.Go(func() error { return p2p.swarm.Run(drainedCtx) })
		g.Go(func() error { return p2p.members.Run(drainedCtx) })
		if p2p.discovery != nil {
			g.Go(func() error { return p2p.discovery(drainedCtx, p2p.members.SetPeers) })
		}
		if p2p.seeds != nil {
			g.Go(func() error { return p2p.seeds(drainedCtx, p2p.prefetch, p2p.reg) })
		}
	}
	return g.Wait()
}

// p2pParts are the peer-to-peer parts of the agent: the membership probes, the swarm, and the
// server of the agents' control API.
type p2pParts struct {
	members   *membership.Probed
	discovery func(ctx context.Context, set func([]netip.AddrPort)) error
	seeds     func(ctx context.Context, prefetch Prefetch, reg prometheus.Registerer) error
	prefetch  Prefetch
	reg       prometheus.Registerer
	swarm     *swarm.Swarm
	control   *namedServer
}

// startSwarm listens on the peer-to-peer address, splits it between the BitTorrent peer protocol
// and the agents' control API, and starts the swarm.
func startSwarm(cfg Config, blobs *store.Store, client *upstream.Client, reg prometheus.Registerer, log *slog.Logger) (*p2pParts, error) {
	log = log.With("component", "swarm")
	members := membership.NewProbed(cfg.Swarm.P2PAddr, cfg.Swarm.Peers,
		membership.WithLogger(log), membership.WithRegisterer(reg))
	l, err := net.Listen("tcp", cfg.Swarm.P2PAddr.String())
	if err != nil {
		return nil, fmt.Errorf("listen for peers on %s: %w", cfg.Swarm.P2PAddr, err)
	}
	peerListener, controlListener := peerport.Split(l, members.Allowed,
		peerport.WithSplitLogger(log), peerport.WithSplitRegisterer(reg))
	sw, err := swarm.New(swarm.Config{
		Dir:             filepath.Join(cfg.DataDir, "swarm"),
		Membership:      members,
		PeerListener:    peerListener,
		Upstream:        client,
		Local:           blobs,
		SegmentSize:     cfg.Swarm.SegmentSize,
		PieceLength:     cfg.Swarm.PieceLength,
		RampSegments:    cfg.Swarm.RampSegments,
		MinSegments:     cmp.Or(cfg.Swarm.MinSegments, -1),
		MaxUploadRate:   cfg.Swarm.MaxUploadRate,
		MaxDownloadRate: cfg.Swarm.MaxDownloadRate,
		IdleTimeout:     cfg.Swarm.IdleTimeout,
		DataPath:        cfg.Swarm.DataPath,
		Logger:          log,
		Registerer:      reg,
	})
	if err != nil {
		_ = peerListener.Close()
		_ = controlListener.Close()
		return nil, err
	}
	log.Info("swarm ready", "p2p_addr", cfg.Swarm.P2PAddr, "members", len(members.Members()))
	prefetch := func(ctx context.Context, registry, repo string, d v1.Hash, size int64) (int, error) {
		if !cfg.mirrors(registry) {
			return 0, fmt.Errorf("prefetch %s: registry %s is not mirrored", d, registry)
		}
		return sw.Prefetch(ctx, registry, repo, d, size)
	}
	return &p2pParts{members: members, discovery: cfg.Swarm.Discovery, seeds: cfg.Swarm.Seeds, prefetch: prefetch, reg: reg, swarm: sw, control: &namedServer{name: "p2p control", listener: controlListener, server: &http.Server{
		Handler:           sw.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}}}, nil
}

// upstreamSource fetches a whole blob from its registry, as the mirror does without the swarm.
func upstreamSource(client *upstream.Client) func(registry, repo string, d v1.Hash, _ []netip.AddrPort) store.Source {
	return func(registry, repo string, d v1.Hash, _ []netip.AddrPort) store.Source {
		return func(ctx context.Context) (io.ReadCloser, int64, error) {
			return client.Blob(ctx, registry, repo, d, 0, -1)
		}
	}
}

// mirrors reports whether the agent mirrors a registry.
func (c *Config) mirrors(registry string) bool {
	return slices.Contains(c.MirrorRegistries, "*") || slices.Contains(c.MirrorRegistries, registry)
}

// logFindings logs what the preflight found.
func logFindings(findings []ContainerdFinding, log *slog.Logger) {
	for _, f := range findings {
		switch {
		case f.Info:
			log.Info("containerd's configuration", "reason", f.Reason, "note", f.Message)
		case f.Reason == ReasonHostsNotRead:
			log.Warn("containerd will ignore the mirror: pulls bypass Shoal until this is fixed", "reason", f.Reason, "error", f.Message)
		default:
			log.Warn("containerd's configuration works against Shoal", "reason", f.Reason, "error", f.Message)
		}
	}
}

func writeHostsConfig(cfg Config, endpoints *endpointResolver, log *slog.Logger) error {
	err := hostconfig.Write(hostconfig.Config{
		Dir:         cfg.ContainerdHostsDir,
		MirrorURL:   "http://" + cfg.MirrorAddr,
		Registries:  cfg.MirrorRegistries,
		Upstream:    endpoints.server,
		DialTimeout: cfg.MirrorDialTimeout,
	})
	if err != nil {
		return fmt.Errorf("write containerd hosts.toml under %s: %w", cfg.ContainerdHostsDir, err)
	}
	log.Info("containerd pointed at the mirror", "hosts_dir", cfg.ContainerdHostsDir, "registries", cfg.MirrorRegistries)
	return nil
}

// DefaultHostsRecheck is how often the agent checks that containerd's hosts.toml files are still
// the ones it wrote, when Config.HostsRecheck is zero.
const DefaultHostsRecheck = 30 * time.Second

// keepHostsConfig checks every Config.HostsRecheck that the hosts.toml files under containerd's
// directory are still those the agent wrote, and writes them again when not: something else
// rewrote the directory (k3s and RKE2 rebuild theirs from registries.yaml whenever they start,
// deleting files they did not write), and until the agent's entry is back, pulls bypass it.
// The rewrite merges into whatever is there now, as at start. It returns when ctx ends.
func keepHostsConfig(ctx context.Context, cfg Config, endpoints *endpointResolver, rewrites prometheus.Counter, log *slog.Logger) {
	every := cfg.HostsRecheck
	if every <= 0 {
		every = DefaultHostsRecheck
	}
	written := hostsFiles(cfg.ContainerdHostsDir)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if maps.Equal(hostsFiles(cfg.ContainerdHostsDir), written) {
			continue
		}
		log.Warn("containerd's hosts.toml files changed under the agent: writing its own again", "hosts_dir", cfg.ContainerdHostsDir)
		if err := writeHostsConfig(cfg, endpoints, log); err != nil {
			log.Error("cannot write containerd's hosts.toml again: pulls bypass Shoal", "error", err)
			continue
		}
		rewrites.Inc()
		written = hostsFiles(cfg.ContainerdHostsDir)
	}
}

// hostsFiles reads every registry's hosts.toml under dir, by path.
func hostsFiles(dir string) map[string]string {
	files := map[string]string{}
	paths, _ := filepath.Glob(filepath.Join(dir, "*", "hosts.toml"))
	for _, p := range paths {
		if data, err := os.ReadFile(p); err == nil {
			files[p] = string(data)
		}
	}
	return files
}

// alongside runs a and b (either may be nil) together, until both return; the first error is
// returned and ends the other's context.
func alongside(a, b func(context.Context) error) func(context.Context) error {
	if a == nil {
		return b
	}
	if b == nil {
		return a
	}
	return func(ctx context.Context) error {
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() error { return a(gctx) })
		g.Go(func() error { return b(gctx) })
		return g.Wait()
	}
}

// endpointResolver decides where a registry is really served: an explicit --registry-endpoint,
// else the server of a hosts.toml the node already had for it, else the registry's usual endpoint.
type endpointResolver struct {
	explicit map[string]upstream.Endpoint
	hostsDir string
}

func newEndpointResolver(cfg Config) *endpointResolver {
	r := &endpointResolver{explicit: map[string]upstream.Endpoint{}, hostsDir: cfg.ContainerdHostsDir}
	for registry, raw := range cfg.RegistryEndpoints {
		endpoint, _ := upstream.ParseEndpoint(raw) // validated by Config.Validate
		r.explicit[registry] = endpoint
	}
	return r
}

func (r *endpointResolver) resolve(registry string) (upstream.Endpoint, error) {
	if endpoint, ok := r.explicit[registry]; ok {
		return endpoint, nil
	}
	if r.hostsDir != "" {
		server, err := hostconfig.ExistingServer(r.hostsDir, registry)
		if err != nil {
			return upstream.Endpoint{}, fmt.Errorf("read the existing hosts.toml of %s: %w", registry, err)
		}
		if server != "" {
			return upstream.ParseEndpoint(server)
		}
	}
	return upstream.DefaultEndpoint(registry), nil
}

// tls returns the TLS settings the node's existing hosts.toml gives the registry's endpoint (see
// hostconfig.ExistingTLS): none when the agent writes no hosts.toml or none matches.
func (r *endpointResolver) tls(registry string, endpoint upstream.Endpoint) (upstream.TLSSettings, error) {
	if r.hostsDir == "" {
		return upstream.TLSSettings{}, nil
	}
	t, err := hostconfig.ExistingTLS(r.hostsDir, registry, endpoint.String())
	if err != nil {
		return upstream.TLSSettings{}, fmt.Errorf("read the existing hosts.toml of %s: %w", registry, err)
	}
	s := upstream.TLSSettings{CAFiles: t.CA, SkipVerify: t.SkipVerify, Source: t.Source}
	for _, pair := range t.Client {
		s.ClientCerts = append(s.ClientCerts, upstream.ClientCert{CertFile: pair[0], KeyFile: pair[1]})
	}
	return s, nil
}

// readRootCAs reads RegistryCAFile, if given.
func readRootCAs(path string) ([]*x509.Certificate, error) {
	if path == "" {
		return nil, nil
	}
	certs, err := upstream.ReadCAFile(path)
	if err != nil {
		return nil, fieldError("RegistryCAFile", err)
	}
	return certs, nil
}

// server is the upstream URL written into hosts.toml after the mirror, for containerd to fall back to.
func (r *endpointResolver) server(registry string) string {
	if registry == "*" {
		return ""
	}
	endpoint, err := r.resolve(registry)
	if err != nil {
		return ""
	}
	return endpoint.String()
}

func opsHandler(reg *prometheus.Registry, ready *atomic.Bool, health *liveness, faults *faultHooks, profiles bool) http.Handler {
	mux := http.NewServeMux()
	if faults != nil {
		mux.HandleFunc("POST /debug/faults/wedge", faults.serveWedge)
	}
	if profiles {
		// What net/http/pprof registers on http.DefaultServeMux, which the agent does not serve.
		mux.HandleFunc("/debug/pprof/", pprof.Index) // the named profiles: heap, goroutine, ...
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", health.serve)
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

type namedServer struct {
	name     string
	listener net.Listener
	server   *http.Server
}

// run serves until ctx ends, then shuts the server down: requests in flight get shutdownGrace
// to finish before their connections are cut. It returns an error only if serving failed.
func (s *namedServer) run(ctx context.Context) error {
	served := make(chan error, 1)
	go func() { served <- s.server.Serve(s.listener) }()
	select {
	case err := <-served:
		return fmt.Errorf("%s server: %w", s.name, err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := s.server.Shutdown(shutdownCtx); err != nil {
		_ = s.server.Close()
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s server: %w", s.name, err)
	}
	return nil
}
