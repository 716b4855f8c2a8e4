package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/controllers/resolve"
)

// controllerConfig is what `shoal controller` takes from its flags.
type controllerConfig struct {
	kubeconfig       string
	metricsAddr      string
	healthAddr       string
	leaderElect      bool
	leaderNamespace  string
	leaseDuration    time.Duration
	gracefulShutdown time.Duration
	endpoints        map[string]string
	resolveTimeout   time.Duration
	registryCAFile   string
	seedPods         bool
	seedTTL          time.Duration
	namespaces       []string
	maxPinnedBytes   int64
	namespace        string
	pullTokens       bool
	apiQPS           float32
	apiBurst         int
}

func newControllerCommand() *cobra.Command {
	var cfg controllerConfig
	cmd := &cobra.Command{
		Use:   "controller",
		Short: "Run the controller: NodeCaches for Nodes, Prewarms resolved and rolled up",
		Long: "Run Shoal's controller. It keeps one NodeCache per Node with the content that the Prewarms\n" +
			"selecting the node ask for, and reports their progress in the Prewarms' status. It writes a\n" +
			"SwarmSeed for each image manifest that pending pods are about to pull, so that the agents\n" +
			"fetch it before the kubelets ask. Several replicas may run: one leads (a Lease), the others wait.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := commandLogger(cmd)
			if err != nil {
				return err
			}
			ctrl.SetLogger(logr.FromSlogHandler(log.Handler()))
			if cfg.seedTTL <= 0 {
				return fmt.Errorf("--seed-ttl %v: must be positive", cfg.seedTTL)
			}
			restCfg, err := loadRESTConfig(cfg.kubeconfig)
			if err != nil {
				return err
			}
			// client-go's default of 5 requests a second (burst 10) made the first start at
			// 1,000 nodes take 200 s to write their NodeCaches, and queued SwarmSeeds behind
			// them (docs/benchmarks.md, "Controller at scale"). The API server's priority and
			// fairness protects it; --kube-api-qps sets a client-side limit where wanted.
			restCfg.QPS, restCfg.Burst = cfg.apiQPS, cfg.apiBurst
			scheme, err := controllers.Scheme()
			if err != nil {
				return err
			}
			skipNameValidation := true
			mgr, err := ctrl.NewManager(restCfg, ctrl.Options{
				Scheme:                  scheme,
				Metrics:                 metricsserver.Options{BindAddress: cfg.metricsAddr},
				HealthProbeBindAddress:  cfg.healthAddr,
				LeaderElection:          cfg.leaderElect,
				LeaderElectionID:        "shoal-controller.shoal.dev",
				LeaderElectionNamespace: cfg.leaderNamespace,
				LeaseDuration:           &cfg.leaseDuration,
				// A leader that stops gives the Lease up at once: the next replica need not wait
				// for it to expire.
				LeaderElectionReleaseOnCancel: true,
				GracefulShutdownTimeout:       &cfg.gracefulShutdown,
				// controller-runtime refuses a controller whose name a controller in the same
				// process has used before, to keep their metrics apart. This command builds one
				// manager with distinct controllers; the check only made a second run of the
				// command in one process (its tests) fail to start.
				Controller: config.Controller{SkipNameValidation: &skipNameValidation},
				// Pods are read by the pod seeding only: cached with just what it reads.
				Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
					&corev1.Pod{}: {Transform: controllers.PodCacheTransform},
				}},
			})
			if err != nil {
				return fmt.Errorf("controller manager: %w", err)
			}
			policy := controllers.Policy{Namespaces: cfg.namespaces, MaxPinnedBytesPerNode: cfg.maxPinnedBytes}
			if err := (&controllers.NodeCacheReconciler{
				Policy:   policy,
				Client:   mgr.GetClient(),
				Recorder: mgr.GetEventRecorder("shoal-controller"),
			}).SetupWithManager(mgr); err != nil {
				return err
			}
			// Registries served over plain HTTP are the ones given an http:// endpoint.
			var insecure []string
			for registry, url := range cfg.endpoints {
				if strings.HasPrefix(url, "http://") {
					insecure = append(insecure, registry)
				}
			}
			resolveOpts := []resolve.ResolverOption{resolve.WithEndpoints(cfg.endpoints), resolve.WithInsecure(insecure...),
				resolve.WithTimeout(cfg.resolveTimeout), resolve.WithRegisterer(metrics.Registry)}
			if cfg.registryCAFile != "" {
				rt, err := transportTrusting(cfg.registryCAFile)
				if err != nil {
					return fmt.Errorf("%s: %w", flagLabel(cmd.Flags(), "registry-ca-file"), err)
				}
				resolveOpts = append(resolveOpts, resolve.WithTransport(rt))
			}
			resolver, err := resolve.New(resolveOpts...)
			if err != nil {
				return fmt.Errorf("--registry-endpoint: %w", err)
			}
			var tokens *controllers.PullTokens
			if cfg.pullTokens {
				tokens = &controllers.PullTokens{Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Namespace: cfg.namespace, Issuer: resolver, Registerer: metrics.Registry}
				if err := mgr.Add(manager.RunnableFunc(tokens.Run)); err != nil {
					return err
				}
			}
			if err := (&controllers.PrewarmReconciler{
				Tokens:     tokens,
				Policy:     policy,
				Client:     mgr.GetClient(),
				Resolver:   controllers.RegistryResolver{R: resolver},
				Recorder:   mgr.GetEventRecorder("shoal-controller"),
				Registerer: metrics.Registry,
			}).SetupWithManager(mgr); err != nil {
				return err
			}
			if err := (&controllers.SwarmSeedTTLReconciler{
				Client:     mgr.GetClient(),
				TTL:        cfg.seedTTL,
				Registerer: metrics.Registry,
			}).SetupWithManager(mgr); err != nil {
				return err
			}
			if cfg.seedPods {
				if err := (&controllers.PodSeedReconciler{
					Client:     mgr.GetClient(),
					APIReader:  mgr.GetAPIReader(),
					Resolver:   resolver,
					TTL:        cfg.seedTTL,
					Tokens:     tokens,
					Registerer: metrics.Registry,
				}).SetupWithManager(mgr); err != nil {
					return err
				}
			}
			if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
				return err
			}
			// Ready once the caches have synced: a replica that cannot reach the API server is
			// not ready.
			if err := mgr.AddReadyzCheck("informers", func(req *http.Request) error {
				if !mgr.GetCache().WaitForCacheSync(req.Context()) {
					return errors.New("informer caches not synced")
				}
				return nil
			}); err != nil {
				return err
			}
			log.Info("controller starting", "version", version, "leader_election", cfg.leaderElect,
				"metrics_addr", cfg.metricsAddr, "health_addr", cfg.healthAddr)
			if err := mgr.Start(cmd.Context()); err != nil {
				return fmt.Errorf("controller: %w", err)
			}
			log.Info("controller stopped")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig file; \"\" = $KUBECONFIG, or the pod's service account in a cluster")
	f.StringVar(&cfg.metricsAddr, "metrics-addr", ":8080", `address of /metrics; "0" = off`)
	f.StringVar(&cfg.healthAddr, "health-addr", ":8081", `address of /healthz and /readyz; "0" = off`)
	f.BoolVar(&cfg.leaderElect, "leader-elect", true, "elect one active replica through a Lease")
	f.StringVar(&cfg.leaderNamespace, "leader-election-namespace", "", `namespace of the Lease; "" = the pod's own`)
	f.DurationVar(&cfg.leaseDuration, "lease-duration", 15*time.Second, "how long a replica waits for a silent leader's Lease to expire")
	f.DurationVar(&cfg.gracefulShutdown, "graceful-shutdown", 30*time.Second, "how long reconciles in flight may take to finish on shutdown")
	f.Var(newEndpointsValue(&cfg.endpoints), "registry-endpoint", "REGISTRY=URL: where a registry is really served, e.g. registry.test=http://127.0.0.1:5000 (repeatable; http:// allows plain HTTP for it)")
	f.StringVar(&cfg.registryCAFile, "registry-ca-file", "", "PEM file of CA certificates trusted for every registry besides the system roots (registries with a private CA)")
	f.DurationVar(&cfg.resolveTimeout, "resolve-timeout", resolve.DefaultTimeout, "bound on each registry call made to resolve a reference")
	f.BoolVar(&cfg.seedPods, "seed-pods", true, "write a SwarmSeed for each image manifest that pending pods are about to pull")
	f.Float32Var(&cfg.apiQPS, "kube-api-qps", -1, "client-side limit on requests a second to the API server; -1 = none (the API server's priority and fairness applies)")
	f.IntVar(&cfg.apiBurst, "kube-api-burst", 100, "requests above --kube-api-qps allowed in a burst")
	f.StringSliceVar(&cfg.namespaces, "prewarm-namespaces", nil, "namespaces whose Prewarms reach nodes, comma-separated; empty = every namespace (a Prewarm elsewhere is reported NamespaceNotAllowed and fetches nothing)")
	f.Var(newQuantityValue(&cfg.maxPinnedBytes, 0), "max-pinned-bytes-per-node", "the most bytes that Prewarms, all namespaces together, may pin on one node (Kubernetes quantity, e.g. 200Gi): content past it is left out of the node's NodeCache (spec.refused, an event on the Node) and reported PinLimitExceeded in the Prewarms asking for it, older Prewarms first; 0 = no bound (each agent's --max-pinned-share still holds)")
	f.StringVar(&cfg.namespace, "namespace", "shoal-system", "Shoal's own namespace (set it from the downward API: metadata.namespace): where the pull tokens for agents are written, the only namespace whose Secrets agents may read")
	f.BoolVar(&cfg.pullTokens, "pull-tokens", true, "exchange the imagePullSecrets of Prewarms for short-lived, repository-scoped pull tokens that agents read from --namespace (the credentials themselves for a registry with basic authentication only); false = agents pull with their own credentials only")
	f.DurationVar(&cfg.seedTTL, "seed-ttl", controllers.DefaultSeedTTL, "how long a SwarmSeed lives before the controller deletes it; a manifest is not seeded again within it")
	f.String("log-level", "info", "debug, info, warn or error")
	f.String("log-format", "text", "text or json")
	return cmd
}

// loadRESTConfig reads the kubeconfig file given, else $KUBECONFIG, else the in-cluster
// service account.
func loadRESTConfig(path string) (*rest.Config, error) {
	if path == "" {
		path = strings.TrimSpace(os.Getenv("KUBECONFIG"))
	}
	if path != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no --kubeconfig, no $KUBECONFIG, and not in a cluster: %w", err)
	}
	return cfg, nil
}

// transportTrusting is go-containerregistry's default transport, trusting the CAs in the PEM
// file caFile besides the system roots (read as the agent's --registry-ca-file is).
func transportTrusting(caFile string) (http.RoundTripper, error) {
	certs, err := upstream.ReadCAFile(caFile)
	if err != nil {
		return nil, err
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	for _, c := range certs {
		pool.AddCert(c)
	}
	base, ok := remote.DefaultTransport.(*http.Transport)
	if !ok {
		return nil, fmt.Errorf("go-containerregistry's default transport is a %T, not an *http.Transport", remote.DefaultTransport)
	}
	t := base.Clone()
	if t.TLSClientConfig == nil {
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	t.TLSClientConfig.RootCAs = pool
	return t, nil
}
