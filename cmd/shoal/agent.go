package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"

	"github.com/shoal-dev/shoal/agent"
	"github.com/shoal-dev/shoal/agent/criruntime"
	"github.com/shoal-dev/shoal/agent/kubecreds"
	"github.com/shoal-dev/shoal/agent/kubemembers"
	"github.com/shoal-dev/shoal/agent/kubeseeds"
	"github.com/shoal-dev/shoal/agent/mirror"
	"github.com/shoal-dev/shoal/agent/nodecache"
	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/swarm"
)

func newAgentCommand() *cobra.Command {
	var (
		cfg          agent.Config
		rampSegments int
	)
	var kube kubeFlags
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: the registry mirror containerd pulls through",
		Long: `Run the node agent. It serves the OCI Distribution API (pull side) on --mirror-addr,
answers from its node-local content store, fetches misses from the upstream registry while
keeping them, and writes containerd hosts.toml files that list the mirror ahead of the upstream,
so that pulls fall back to the upstream within milliseconds whenever the agent cannot help.

` + envHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if cfg.Logger, err = commandLogger(cmd); err != nil {
				return err
			}
			switch {
			case rampSegments < 0:
				return fmt.Errorf("%s %d: want 0 or more", flagLabel(cmd.Flags(), "swarm-ramp-segments"), rampSegments)
			case rampSegments == 0:
				cfg.Swarm.RampSegments = -1 // none
			default:
				cfg.Swarm.RampSegments = rampSegments
			}
			if err := kube.apply(cmd, &cfg); err != nil {
				return err
			}
			return flagError(cmd.Flags(), agent.Run(cmd.Context(), cfg))
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.MirrorAddr, "mirror-addr", "127.0.0.1:5001", "IP:PORT where containerd reaches the mirror (keep it on loopback)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/shoal", "directory of the content store")
	f.Var(newQuantityValue(&cfg.CacheSize, 50<<30), "cache-size", "content store limit (Kubernetes quantity); least recently used unpinned blobs are evicted beyond it; 0 = unlimited")
	f.StringVar(&cfg.ContainerdHostsDir, "containerd-hosts-dir", "/etc/containerd/certs.d", `containerd's config_path, where hosts.toml files are written; "" = do not write them`)
	f.StringVar(&cfg.ContainerdHostsDirOnHost, "containerd-hosts-dir-on-host", "", `the same directory as containerd's config names it, when the agent runs in a container that mounts it elsewhere (the preflight compares it with config_path); "" = --containerd-hosts-dir`)
	f.StringVar(&cfg.ContainerdConfig, "containerd-config", "/etc/containerd/config.toml", `containerd's config.toml, checked for config_path (a warning is logged when it is missing); "" = skip the check`)
	f.StringSliceVar(&cfg.MirrorRegistries, "mirror-registries", []string{"docker.io"}, `registries to mirror, comma-separated; "*" = every registry (written as _default/hosts.toml)`)
	f.Var(newEndpointsValue(&cfg.RegistryEndpoints), "registry-endpoint", "REGISTRY=URL: where a registry is really served, e.g. registry.test=http://127.0.0.1:5000 (repeatable); default: the server of an existing hosts.toml, else the registry's usual endpoint")
	f.StringVar(&cfg.RegistryAuthFile, "registry-auth-file", "", "docker config.json with credentials for upstream registries")
	f.StringVar(&cfg.RegistryCAFile, "registry-ca-file", "", "PEM file of CA certificates trusted for every upstream registry besides the system roots; a registry's own ca, client and skip_verify come from its existing hosts.toml")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "127.0.0.1:9091", `IP:PORT serving /metrics, /healthz and /readyz; "" = disabled`)
	f.BoolVar(&cfg.Pprof, "pprof", false, "also serve Go's profiles (net/http/pprof) under /debug/pprof/ on --metrics-addr, e.g. go tool pprof http://127.0.0.1:9091/debug/pprof/profile?seconds=30; only where nobody else can reach that address")
	f.StringVar(&cfg.DefaultRegistry, "default-registry", "docker.io", "registry for requests that carry no ?ns= parameter (clients other than containerd)")
	f.DurationVar(&cfg.MirrorDialTimeout, "mirror-dial-timeout", 200*time.Millisecond, "dial_timeout written into hosts.toml for the mirror host (containerd 1.7+ honours it)")
	f.DurationVar(&cfg.HostsRecheck, "hosts-recheck-interval", agent.DefaultHostsRecheck, "how often to check that containerd's hosts.toml files are still the ones the agent wrote, and write them again if not (k3s and RKE2 rebuild their certs.d when they restart)")
	f.DurationVar(&cfg.ManifestTimeout, "manifest-timeout", 10*time.Second, "how long resolving a manifest upstream may take before the runtime is sent to its next host")
	f.DurationVar(&cfg.FirstByteTimeout, "mirror-first-byte-timeout", mirror.DefaultFirstByteTimeout, "a request the agent cannot start answering within this time gets 503, and containerd goes to its next host (keep it at most 10s: containerd 2.x gives a mirror 30s, 1.6 waits for ever)")
	f.DurationVar(&cfg.BodyIdleTimeout, "mirror-body-idle-timeout", mirror.DefaultBodyIdleTimeout, "a response body that sends nothing for this long is cut, so the runtime retries instead of hanging")
	f.BoolVar(&cfg.FaultInjection, "fault-injection", false, "serve POST /debug/faults/wedge?on=true|false on --metrics-addr, which blocks every content-store call of the mirror as a deadlock would (for testing fallback and liveness probes; never in production)")
	_ = f.MarkHidden("fault-injection")
	f.DurationVar(&cfg.UpstreamTimeouts.Dial, "upstream-dial-timeout", 2*time.Second, "dial timeout for upstream registries")
	f.DurationVar(&cfg.UpstreamTimeouts.ResponseHeader, "upstream-response-timeout", 10*time.Second, "how long an upstream registry may take to answer a request")
	f.DurationVar(&cfg.UpstreamTimeouts.BlobIdle, "upstream-idle-timeout", 30*time.Second, "a blob download that receives no byte for this long fails")
	f.Var(addrPortValue{&cfg.Swarm.P2PAddr}, "p2p-addr", `IP:PORT where peers reach this agent (BitTorrent and the agents' control API share it; also the listen address); "" = no swarm, blobs come from upstream`)
	f.Var(&peersValue{dst: &cfg.Swarm.Peers}, "peers", "IP:PORT,IP:PORT,...: the agents to swarm with (the same list on every node; it may include this node); needs --p2p-addr")
	f.Var(newQuantityValue(&cfg.Swarm.MaxUploadRate, 0), "max-upload-rate", "cap on bytes per second sent to peers (Kubernetes quantity, e.g. 50Mi); 0 = unlimited")
	f.Var(newQuantityValue(&cfg.Swarm.MaxDownloadRate, 0), "max-download-rate", "cap on bytes per second received from peers; 0 = unlimited")
	f.Var(newQuantityValue(&cfg.Swarm.SegmentSize, 16<<20), "swarm-segment-size", "blobs are fetched from upstream and hashed in segments of this size, each by one seeder (the same on every node)")
	f.Var(newQuantityValue(&cfg.Swarm.PieceLength, 1<<20), "swarm-piece-length", "piece length of blob torrents, a power of two (the same on every node)")
	f.IntVar(&cfg.Swarm.MinSegments, "swarm-min-segments", swarm.DefaultMinSegments, "blobs under this many times --swarm-segment-size are cut into this many segments (of whole pieces), so that a seeder lost mid-fetch costs a small share of any blob; 0 = every blob in segments of --swarm-segment-size (the same on every node)")
	f.IntVar(&rampSegments, "swarm-ramp-segments", swarm.DefaultRampSegments, "blobs start with this many segments a quarter of --swarm-segment-size long, published sooner at the start of a rollout; 0 = none (the same on every node)")
	f.StringVar(&cfg.Swarm.DataPath, "swarm-data-path", swarm.DataPathTorrent, `how pieces move between agents: "torrent" (the BitTorrent client) or "pieces" (each piece whole from one peer over HTTP, served with sendfile); the same on every node`)
	f.DurationVar(&cfg.Swarm.IdleTimeout, "swarm-idle-timeout", swarm.DefaultIdleTimeout, "a blob nobody reads stops seeding once its torrents have moved nothing for this long (a delivered blob stays in the content store); unused working files are removed at this age")
	f.StringVar(&kube.membership, "membership", "static", `how agents find each other: "static" (--peers) or "kubernetes" (SwarmMember objects; needs --node-name and --p2p-addr; --peers, if given, is where members start while the API server is unreachable)`)
	f.StringVar(&kube.nodeName, "node-name", "", "this node's name in Kubernetes (set it from the downward API: spec.nodeName)")
	f.StringVar(&kube.kubeconfig, "kubeconfig", "", `kubeconfig file for --membership kubernetes; "" = $KUBECONFIG, or the pod's service account`)
	f.BoolVar(&kube.nodeCache, "node-cache", true, "with --membership kubernetes, make the store hold what this node's NodeCache asks for: fetch each item through the swarm, pin what it pins, release what leaves it, and report in its status; false = ignore the NodeCache")
	f.StringVar(&kube.runtimeEndpoint, "runtime-endpoint", "", `containerd's socket (unix:///run/containerd/containerd.sock), for NodeCache items that import images into the container runtime (a Prewarm's runtimeImport: Pinned): pulled through CRI, so through this mirror, and pinned with containerd's io.cri-containerd.pinned label; "" = such items fail ImportFailed`)
	f.StringVar(&kube.namespace, "namespace", "shoal-system", `Shoal's own namespace (set it from the downward API: metadata.namespace): with --membership kubernetes, private repositories are pulled with the pull tokens the controller writes there, looked up by name (one GET per repository, remembered); "" = none`)
	f.StringVar(&kube.runtimeNamespace, "runtime-namespace", criruntime.DefaultNamespace, "containerd namespace of the CRI plugin's images")
	f.BoolVar(&kube.prefetchSeeds, "prefetch-seeds", true, "with --membership kubernetes, watch SwarmSeeds (images pending pods are about to pull) and fetch from upstream at once the segments this node seeds of their blobs; false = wait for the pulls")
	f.DurationVar(&kube.nodeCacheStatusInterval, "node-cache-status-interval", nodecache.DefaultStatusInterval, "the NodeCache status is written at most this often while only bytes move; state changes are written at once")
	f.Float64Var(&kube.maxPinnedShare, "max-pinned-share", 0.5, "the most NodeCache items may pin of the store (--cache-size), 0-1: an item that would pass it is neither pinned nor fetched, and reported PinLimitExceeded; 0 = no bound")
	f.DurationVar(&kube.nodeCacheStallTimeout, "node-cache-stall-timeout", nodecache.DefaultStallTimeout, "a NodeCache download that moves no byte for this long is retried (with backoff); one that keeps moving is never cut")
	f.DurationVar(&kube.nodeCacheStoreRecheck, "node-cache-store-recheck", nodecache.DefaultStoreRecheck, "how often, on average, each held NodeCache item is looked up in the store (an index lookup per blob, no data read), to fetch and pin it again when its content left the store out of band")
	f.DurationVar(&kube.nodeCacheRuntimeRecheck, "node-cache-runtime-recheck", nodecache.DefaultRuntimeRecheck, "how often each NodeCache item imported into the container runtime is checked there (one CRI image status call), to import and pin it again when it was removed or unpinned out of band")
	f.String("log-level", "info", "debug, info, warn or error")
	f.String("log-format", "json", "json or text")
	cfg.UpstreamTimeouts.Manifest = 0 // bounded by --manifest-timeout in the mirror
	return cmd
}

// agentFlags names the flag that sets each field of agent.Config that the agent can refuse
// (agent.FieldError), so that its errors name what the user typed.
var agentFlags = map[string]string{
	"MirrorAddr":            "mirror-addr",
	"DataDir":               "data-dir",
	"CacheSize":             "cache-size",
	"MirrorRegistries":      "mirror-registries",
	"RegistryEndpoints":     "registry-endpoint",
	"RegistryCAFile":        "registry-ca-file",
	"DefaultRegistry":       "default-registry",
	"Swarm.P2PAddr":         "p2p-addr",
	"Swarm.Peers":           "peers",
	"Swarm.MinSegments":     "swarm-min-segments",
	"Swarm.MaxUploadRate":   "max-upload-rate",
	"Swarm.MaxDownloadRate": "max-download-rate",
	"Swarm.DataPath":        "swarm-data-path",
}

// flagError rewrites an agent error about a Config field (agent.FieldError) in terms of the
// flag, or the environment variable, that set the field.
func flagError(fs *pflag.FlagSet, err error) error {
	var field *agent.FieldError
	if !errors.As(err, &field) {
		return err
	}
	name, ok := agentFlags[field.Field]
	if !ok {
		return err
	}
	if field.Needs != "" {
		if other, ok := agentFlags[field.Needs]; ok {
			return fmt.Errorf("%s needs %s", flagLabel(fs, name), flagLabel(fs, other))
		}
	}
	return fmt.Errorf("%s: %w", flagLabel(fs, name), field.Err)
}

// kubeFlags are the agent's flags for running in Kubernetes.
type kubeFlags struct {
	membership, nodeName, kubeconfig  string
	runtimeEndpoint, runtimeNamespace string
	namespace                         string
	nodeCache                         bool
	prefetchSeeds                     bool
	nodeCacheStatusInterval           time.Duration
	nodeCacheStoreRecheck             time.Duration
	nodeCacheRuntimeRecheck           time.Duration
	nodeCacheStallTimeout             time.Duration
	maxPinnedShare                    float64
}

// apply sets up the Kubernetes membership, and the NodeCache worker unless --node-cache=false,
// when --membership kubernetes asks for it.
func (k *kubeFlags) apply(cmd *cobra.Command, cfg *agent.Config) error {
	fs := cmd.Flags()
	switch k.membership {
	case "static":
		return nil
	case "kubernetes":
	default:
		return fmt.Errorf("%s %q: want static or kubernetes", flagLabel(fs, "membership"), k.membership)
	}
	if k.nodeName == "" {
		return fmt.Errorf("%s kubernetes needs %s", flagLabel(fs, "membership"), flagLabel(fs, "node-name"))
	}
	if !cfg.Swarm.P2PAddr.IsValid() {
		return fmt.Errorf("%s kubernetes needs %s", flagLabel(fs, "membership"), flagLabel(fs, "p2p-addr"))
	}
	if k.nodeCacheStatusInterval <= 0 {
		return fmt.Errorf("%s %s: want more than 0", flagLabel(fs, "node-cache-status-interval"), k.nodeCacheStatusInterval)
	}
	for name, d := range map[string]time.Duration{"node-cache-store-recheck": k.nodeCacheStoreRecheck, "node-cache-runtime-recheck": k.nodeCacheRuntimeRecheck} {
		if d <= 0 {
			return fmt.Errorf("%s %s: want more than 0", flagLabel(fs, name), d)
		}
	}
	if k.maxPinnedShare < 0 || k.maxPinnedShare > 1 {
		return fmt.Errorf("%s %v: want a share between 0 and 1", flagLabel(fs, "max-pinned-share"), k.maxPinnedShare)
	}
	if k.nodeCacheStallTimeout <= 0 {
		return fmt.Errorf("%s %s: want more than 0", flagLabel(fs, "node-cache-stall-timeout"), k.nodeCacheStallTimeout)
	}
	if k.runtimeEndpoint != "" {
		if _, err := criruntime.SocketPath(k.runtimeEndpoint); err != nil {
			return fmt.Errorf("%s: %w", flagLabel(fs, "runtime-endpoint"), err)
		}
	}
	restCfg, err := loadRESTConfig(k.kubeconfig)
	if err != nil {
		return fmt.Errorf("%s kubernetes: %w", flagLabel(fs, "membership"), err)
	}
	src, err := kubemembers.New(restCfg, kubemembers.Config{
		NodeName:        k.nodeName,
		Self:            cfg.Swarm.P2PAddr,
		ProtocolVersion: plan.ProtocolVersion,
		AgentVersion:    version,
		StateFile:       filepath.Join(cfg.DataDir, "members.json"),
		Bootstrap:       cfg.Swarm.Peers,
		Logger:          cfg.Logger.With("component", "kubemembers"),
	})
	if err != nil {
		return err
	}
	cfg.Swarm.Discovery = src.Run
	if k.namespace != "" {
		kc, err := kubecreds.New(restCfg, k.namespace, cfg.Logger.With("component", "kubecreds"))
		if err != nil {
			return err
		}
		cfg.Keychains = append(cfg.Keychains, kc)
	}
	if k.prefetchSeeds {
		seedLog := cfg.Logger.With("component", "kubeseeds")
		cfg.Swarm.Seeds = func(ctx context.Context, prefetch agent.Prefetch, reg prometheus.Registerer) error {
			return kubeseeds.New(restCfg, kubeseeds.Prefetch(prefetch),
				kubeseeds.WithLogger(seedLog), kubeseeds.WithRegisterer(reg)).Run(ctx)
		}
	}
	if k.nodeCache {
		cfg.NodeCache = k.nodeCacheHook(restCfg, cfg.Swarm.P2PAddr.String(), src.Addrs, cfg.Logger.With("component", "nodecache"))
	}
	return nil
}

// reportOnNode records each finding of the preflight as an event on the node (Warning, or
// Normal for one that keeps nothing from working), once per agent start, so that
// `kubectl describe node` shows it; failing to is logged, never fatal.
func reportOnNode(ctx context.Context, restCfg *rest.Config, node string, findings []agent.ContainerdFinding, log *slog.Logger) {
	if len(findings) == 0 {
		return
	}
	client, err := corev1client.NewForConfig(restCfg)
	if err != nil {
		log.Warn("cannot report containerd's configuration on the Node", "error", err)
		return
	}
	now := metav1.Now()
	for _, p := range findings {
		kind := corev1.EventTypeWarning
		if p.Info {
			kind = corev1.EventTypeNormal
		}
		ev := &corev1.Event{
			ObjectMeta:          metav1.ObjectMeta{GenerateName: node + ".shoal-", Namespace: metav1.NamespaceDefault},
			InvolvedObject:      corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: node, UID: types.UID(node)},
			Reason:              p.Reason,
			Message:             p.Message,
			Type:                kind,
			Source:              corev1.EventSource{Component: "shoal-agent", Host: node},
			FirstTimestamp:      now,
			LastTimestamp:       now,
			Count:               1,
			ReportingController: "shoal.dev/agent",
			ReportingInstance:   node,
		}
		ectx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := client.Events(metav1.NamespaceDefault).Create(ectx, ev, metav1.CreateOptions{})
		cancel()
		if err != nil {
			log.Warn("cannot report containerd's configuration on the Node", "reason", p.Reason, "error", err)
		}
	}
}

// nodeCacheHook runs the NodeCache worker on the agent's content parts.
func (k *kubeFlags) nodeCacheHook(restCfg *rest.Config, peerAddress string, seeders func([]string) []netip.AddrPort, log *slog.Logger) func(context.Context, agent.Content) error {
	return func(ctx context.Context, content agent.Content) error {
		reportOnNode(ctx, restCfg, k.nodeName, content.ContainerdFindings, log)
		// The NodeCache's condition is about what keeps Shoal from working on the node.
		var problems []nodecache.Problem
		for _, f := range content.ContainerdFindings {
			if !f.Info {
				problems = append(problems, nodecache.Problem{Reason: f.Reason, Message: f.Message})
			}
		}
		var runtime nodecache.Runtime
		if k.runtimeEndpoint != "" {
			rt, err := criruntime.Dial(k.runtimeEndpoint, k.runtimeNamespace)
			if err != nil {
				return err
			}
			defer rt.Close()
			runtime = rt
		}
		w, err := nodecache.New(restCfg, nodecache.Config{
			Runtime:            runtime,
			NodeName:           k.nodeName,
			AgentVersion:       version,
			PeerAddress:        peerAddress,
			Store:              content.Store,
			Manifests:          content.Upstream,
			BlobSource:         content.BlobSource,
			Seeders:            seeders,
			Mirrors:            content.Mirrors,
			StatusInterval:     k.nodeCacheStatusInterval,
			StallTimeout:       k.nodeCacheStallTimeout,
			StoreRecheck:       k.nodeCacheStoreRecheck,
			RuntimeRecheck:     k.nodeCacheRuntimeRecheck,
			MaxPinnedShare:     k.maxPinnedShare,
			ContainerdProblems: problems,
			Registerer:         content.Registerer,
			Logger:             log,
		})
		if err != nil {
			return err
		}
		return w.Run(ctx)
	}
}
