package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/shoal-dev/shoal/agent"
	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/mirror"
	"github.com/shoal-dev/shoal/agent/swarm"
	"github.com/shoal-dev/shoal/agent/upstream"
)

func newAgentCommand() *cobra.Command {
	var (
		cfg          agent.Config
		cacheSize    string
		endpoints    []string
		logLevel     string
		logFormat    string
		p2pAddr      string
		profile      string
		peers        string
		rampSegments int
		quantities   = map[string]*string{
			"max-upload-rate":    new(string),
			"max-download-rate":  new(string),
			"swarm-segment-size": new(string),
			"swarm-piece-length": new(string),
		}
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: the registry mirror containerd pulls through",
		Long: `Run the node agent. It serves the OCI Distribution API (pull side) on --mirror-addr,
answers from its node-local content store, fetches misses from the upstream registry while
keeping them, and writes containerd hosts.toml files that list the mirror ahead of the upstream,
so that pulls fall back to the upstream within milliseconds whenever the agent cannot help.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			size, err := resource.ParseQuantity(cacheSize)
			if err != nil {
				return fmt.Errorf("--cache-size %q: %w (examples: 50Gi, 500Mi, 0 for unlimited)", cacheSize, err)
			}
			cfg.CacheSize = size.Value()
			if cfg.RegistryEndpoints, err = parseEndpoints(endpoints); err != nil {
				return err
			}
			if cfg.Logger, err = newLogger(logLevel, logFormat); err != nil {
				return err
			}
			if err := parseSwarmFlags(&cfg.Swarm, p2pAddr, peers, quantities); err != nil {
				return err
			}
			switch {
			case rampSegments < 0:
				return fmt.Errorf("--swarm-ramp-segments %d: want 0 or more", rampSegments)
			case rampSegments == 0:
				cfg.Swarm.RampSegments = -1 // none
			default:
				cfg.Swarm.RampSegments = rampSegments
			}
			if profile != "" {
				stop, err := startCPUProfile(profile, cfg.DataDir)
				if err != nil {
					return err
				}
				defer stop()
			}
			return agent.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.MirrorAddr, "mirror-addr", "127.0.0.1:5001", "IP:PORT where containerd reaches the mirror (keep it on loopback)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/shoal", "directory of the content store")
	f.StringVar(&cacheSize, "cache-size", "50Gi", "content store limit (Kubernetes quantity); least recently used unpinned blobs are evicted beyond it; 0 = unlimited")
	f.StringVar(&cfg.ContainerdHostsDir, "containerd-hosts-dir", "/etc/containerd/certs.d", `containerd's config_path, where hosts.toml files are written; "" = do not write them`)
	f.StringVar(&cfg.ContainerdConfig, "containerd-config", "/etc/containerd/config.toml", `containerd's config.toml, checked for config_path (a warning is logged when it is missing); "" = skip the check`)
	f.StringSliceVar(&cfg.MirrorRegistries, "mirror-registries", []string{"docker.io"}, `registries to mirror, comma-separated; "*" = every registry (written as _default/hosts.toml)`)
	f.StringArrayVar(&endpoints, "registry-endpoint", nil, "REGISTRY=URL: where a registry is really served, e.g. registry.test=http://127.0.0.1:5000 (repeatable); default: the server of an existing hosts.toml, else the registry's usual endpoint")
	f.StringVar(&cfg.RegistryAuthFile, "registry-auth-file", "", "docker config.json with credentials for upstream registries")
	f.StringVar(&cfg.RegistryCAFile, "registry-ca-file", "", "PEM file of CA certificates trusted for every upstream registry besides the system roots; a registry's own ca, client and skip_verify come from its existing hosts.toml")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "127.0.0.1:9091", `IP:PORT serving /metrics, /healthz and /readyz; "" = disabled`)
	f.StringVar(&cfg.DefaultRegistry, "default-registry", "docker.io", "registry for requests that carry no ?ns= parameter (clients other than containerd)")
	f.DurationVar(&cfg.MirrorDialTimeout, "mirror-dial-timeout", 200*time.Millisecond, "dial_timeout written into hosts.toml for the mirror host (containerd 1.7+ honours it)")
	f.DurationVar(&cfg.ManifestTimeout, "manifest-timeout", 10*time.Second, "how long resolving a manifest upstream may take before the runtime is sent to its next host")
	f.DurationVar(&cfg.FirstByteTimeout, "mirror-first-byte-timeout", mirror.DefaultFirstByteTimeout, "a request the agent cannot start answering within this time gets 503, and containerd goes to its next host (keep it at most 10s: containerd 2.x gives a mirror 30s, 1.6 waits for ever)")
	f.DurationVar(&cfg.BodyIdleTimeout, "mirror-body-idle-timeout", mirror.DefaultBodyIdleTimeout, "a response body that sends nothing for this long is cut, so the runtime retries instead of hanging")
	f.BoolVar(&cfg.FaultInjection, "fault-injection", false, "serve POST /debug/faults/wedge?on=true|false on --metrics-addr, which blocks every content-store call of the mirror as a deadlock would (for testing fallback and liveness probes; never in production)")
	_ = f.MarkHidden("fault-injection")
	f.DurationVar(&cfg.UpstreamTimeouts.Dial, "upstream-dial-timeout", 2*time.Second, "dial timeout for upstream registries")
	f.DurationVar(&cfg.UpstreamTimeouts.ResponseHeader, "upstream-response-timeout", 10*time.Second, "how long an upstream registry may take to answer a request")
	f.DurationVar(&cfg.UpstreamTimeouts.BlobIdle, "upstream-idle-timeout", 30*time.Second, "a blob download that receives no byte for this long fails")
	f.StringVar(&p2pAddr, "p2p-addr", "", `IP:PORT where peers reach this agent (BitTorrent and the agents' control API share it; also the listen address); "" = no swarm, blobs come from upstream`)
	f.StringVar(&peers, "peers", "", "IP:PORT,IP:PORT,...: the agents to swarm with (the same list on every node; it may include this node)")
	f.StringVar(quantities["max-upload-rate"], "max-upload-rate", "0", "cap on bytes per second sent to peers (Kubernetes quantity, e.g. 50Mi); 0 = unlimited")
	f.StringVar(quantities["max-download-rate"], "max-download-rate", "0", "cap on bytes per second received from peers; 0 = unlimited")
	f.StringVar(quantities["swarm-segment-size"], "swarm-segment-size", "16Mi", "blobs are fetched from upstream and hashed in segments of this size, each by one seeder (the same on every node)")
	f.StringVar(quantities["swarm-piece-length"], "swarm-piece-length", "1Mi", "piece length of blob torrents, a power of two (the same on every node)")
	f.IntVar(&cfg.Swarm.MinSegments, "swarm-min-segments", swarm.DefaultMinSegments, "blobs under this many times --swarm-segment-size are cut into this many segments (of whole pieces), so that a seeder lost mid-fetch costs a small share of any blob; 0 = every blob in segments of --swarm-segment-size (the same on every node)")
	f.IntVar(&rampSegments, "swarm-ramp-segments", swarm.DefaultRampSegments, "blobs start with this many segments a quarter of --swarm-segment-size long, published sooner at the start of a rollout; 0 = none (the same on every node)")
	f.DurationVar(&cfg.Swarm.IdleTimeout, "swarm-idle-timeout", swarm.DefaultIdleTimeout, "a blob nobody reads stops seeding once its torrents have moved nothing for this long (a delivered blob stays in the content store); unused working files are removed at this age")
	f.StringVar(&profile, "cpu-profile", "", "write a Go CPU profile of the whole run to this file (relative paths are under --data-dir), for performance work")
	_ = f.MarkHidden("cpu-profile")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "json", "json or text")
	cfg.UpstreamTimeouts.Manifest = 0 // bounded by --manifest-timeout in the mirror
	return cmd
}

func parseEndpoints(values []string) (map[string]string, error) {
	endpoints := make(map[string]string, len(values))
	for _, v := range values {
		registry, endpoint, ok := strings.Cut(v, "=")
		if !ok || registry == "" || endpoint == "" {
			return nil, fmt.Errorf("--registry-endpoint %q: want REGISTRY=URL, e.g. registry.test=http://127.0.0.1:5000", v)
		}
		if _, dup := endpoints[registry]; dup {
			return nil, fmt.Errorf("--registry-endpoint: %s given twice", registry)
		}
		if _, err := upstream.ParseEndpoint(endpoint); err != nil {
			return nil, fmt.Errorf("--registry-endpoint %q: %w", v, err)
		}
		endpoints[registry] = endpoint
	}
	return endpoints, nil
}

func parseSwarmFlags(cfg *agent.SwarmConfig, p2pAddr, peers string, quantities map[string]*string) error {
	values := map[string]*int64{
		"max-upload-rate":    &cfg.MaxUploadRate,
		"max-download-rate":  &cfg.MaxDownloadRate,
		"swarm-segment-size": &cfg.SegmentSize,
		"swarm-piece-length": &cfg.PieceLength,
	}
	for name, dst := range values {
		q, err := resource.ParseQuantity(*quantities[name])
		if err != nil {
			return fmt.Errorf("--%s %q: %w", name, *quantities[name], err)
		}
		*dst = q.Value()
	}
	if p2pAddr == "" {
		return nil
	}
	addr, err := netip.ParseAddrPort(p2pAddr)
	if err != nil {
		return fmt.Errorf("--p2p-addr %q: want IP:PORT: %w", p2pAddr, err)
	}
	cfg.P2PAddr = addr
	if peers != "" {
		if cfg.Peers, err = membership.ParsePeers(peers); err != nil {
			return fmt.Errorf("--peers: %w", err)
		}
	}
	return nil
}

// startCPUProfile profiles the process until the returned function is called.
func startCPUProfile(path, dataDir string) (func(), error) {
	if !filepath.IsAbs(path) {
		path = filepath.Join(dataDir, path)
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want json or text", format)
}
