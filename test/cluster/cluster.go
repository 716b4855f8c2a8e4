// Package cluster runs a real Kubernetes cluster on one machine, for Shoal's end-to-end tests
// and its demo: etcd, kube-apiserver, kube-scheduler and kube-controller-manager, and one
// kubelet with its own containerd per node, on the testbed's network namespaces.
//
// Each node is a testbed node (its own network namespace behind the shaped bridge) plus a
// private mount namespace, in which the node has its own /run, /var, /etc/containerd and the
// kernel settings kubelet insists on (files, so that the machine's values never change), and
// its own cgroup v1 subtree. Pods get addresses from Debian's bridge and host-local CNI
// plugins, one /24 per node, routed between nodes; there is no kube-proxy, so Services have no
// virtual IPs, and pods that talk to the API server are told its address (the chart's
// kubernetesServiceHost, as for any cluster without kube-proxy).
//
// The control plane runs in the isolated namespace itself and listens on its bridge address;
// every credential is made here (a CA, static tokens). Nothing can reach outside:
// New refuses to run anywhere but inside harness.RunIsolated. The registry is the testbed's,
// known to the nodes as registry.test; the sandbox image is built here and pushed to it.
//
// The binaries come from hack/install-deps.sh: Kubernetes v1.37 built from the module proxy,
// containerd 2.x built the same way (Debian's 1.6 with WithContainerdBinary), Debian's runc,
// etcd and CNI plugins.
package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/shoal-dev/shoal/internal/imagebuild"
	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/kubeenv"
	"github.com/shoal-dev/shoal/test/testbed"
)

// RegistryName is the made-up name the nodes pull the testbed's registry by.
const RegistryName = "registry.test"

// SandboxImage is the pause image containerd's configuration names (test/harness).
const SandboxImage = "pause:3.9"

// APIServerPort is the API server's port on the isolated namespace's bridge address.
const APIServerPort = 6443

// ServiceCIDR is the Services' range; its first address is the kubernetes Service's.
const ServiceCIDR = "10.96.0.0/16"

const cniPluginDir = "/usr/lib/cni"

// Option changes how the cluster is built.
type Option func(*config)

type config struct {
	logger           *slog.Logger
	containerdBinary string
	nodeLabels       []string
	testbedOpts      []testbed.Option
	keepDir          bool
	helmTimeout      time.Duration
	registryTLS      bool
}

// WithLogger reports what the cluster starts and stops.
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// WithContainerdBinary runs the nodes' containerd from path (default: containerd 2.x).
func WithContainerdBinary(path string) Option { return func(c *config) { c.containerdBinary = path } }

// WithNodeLabels adds labels (key=value) to every node at registration.
func WithNodeLabels(labels ...string) Option {
	return func(c *config) { c.nodeLabels = append(c.nodeLabels, labels...) }
}

// WithTestbed passes options to the testbed under the cluster (link rates, for example).
func WithTestbed(opts ...testbed.Option) Option {
	return func(c *config) { c.testbedOpts = append(c.testbedOpts, opts...) }
}

// WithHelmTimeout bounds InstallShoal's wait for the release to be ready (default 3m).
func WithHelmTimeout(d time.Duration) Option { return func(c *config) { c.helmTimeout = d } }

// WithRegistryTLS has the nodes pull from the registry over HTTPS, with a certificate from the
// cluster's own CA: the nodes' hosts.toml trusts it (ca = "ca.crt" beside it), and
// InstallShoal gives Shoal the CA through the chart's registryCAConfigMap. Pushes still go to
// the plain registry, which serves the same content.
func WithRegistryTLS() Option { return func(c *config) { c.registryTLS = true } }

// WithKeepDir keeps the cluster's directory (logs, node state) after Close.
func WithKeepDir() Option { return func(c *config) { c.keepDir = true } }

// Cluster is a running local cluster.
type Cluster struct {
	cfg    config
	logger *slog.Logger
	tb     *testbed.Testbed
	dir    string
	assets string
	pki    *pki

	etcd, apiserver, scheduler, controllerManager *harness.Process

	nodes       []*Node
	registryURL string // what the nodes pull from: the testbed's registry, or its TLS twin
	restConfig  *rest.Config
	client      kubernetes.Interface
	kubeconfig  string
}

// New builds a cluster of n nodes and waits until every node is Ready and the default
// ServiceAccount exists. On error everything already started is stopped.
func New(ctx context.Context, n int, opts ...Option) (*Cluster, error) {
	cfg := config{logger: slog.New(slog.NewTextHandler(io.Discard, nil)), helmTimeout: 3 * time.Minute}
	for _, o := range opts {
		o(&cfg)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("cluster: a local cluster needs root (network and mount namespaces, cgroups)")
	}
	if cfg.containerdBinary == "" {
		bin, err := harness.Containerd2Binary()
		if err != nil {
			return nil, err
		}
		cfg.containerdBinary = bin
	}
	c := &Cluster{cfg: cfg, logger: cfg.logger, assets: kubeenv.AssetsDir()}
	for _, b := range []string{"kube-apiserver", "kubelet", "kube-scheduler", "kube-controller-manager", "etcd"} {
		if _, err := os.Stat(c.binary(b)); err != nil {
			return nil, fmt.Errorf("cluster: %w (run hack/install-deps.sh)", err)
		}
	}
	tbOpts := append([]testbed.Option{testbed.WithLogger(cfg.logger)}, cfg.testbedOpts...)
	if cfg.keepDir {
		tbOpts = append(tbOpts, testbed.WithKeepDir())
	}
	tb, err := testbed.New(ctx, n, tbOpts...)
	if err != nil {
		return nil, err
	}
	c.tb = tb
	c.dir = filepath.Join(tb.Dir(), "cluster")
	if err := c.build(ctx); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	return c, nil
}

func (c *Cluster) binary(name string) string { return filepath.Join(c.assets, name) }

func (c *Cluster) build(ctx context.Context) error {
	apiIP := c.tb.SwitchAddr()
	var names []string
	for i, tn := range c.tb.Nodes() {
		c.nodes = append(c.nodes, &Node{
			c:          c,
			tb:         tn,
			dir:        filepath.Join(c.dir, "nodes", tn.Name()),
			podCIDR:    netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
			cgroupRoot: fmt.Sprintf("/shoal%d-%s", os.Getpid(), tn.Name()),
		})
		names = append(names, tn.Name())
	}
	var err error
	c.pki, err = newPKI(filepath.Join(c.dir, "pki"), []net.IP{apiIP.AsSlice(), net.IPv4(10, 96, 0, 1), net.IPv4(127, 0, 0, 1)}, names)
	if err != nil {
		return fmt.Errorf("cluster credentials: %w", err)
	}
	c.kubeconfig = filepath.Join(c.dir, "admin.kubeconfig")
	if err := c.pki.kubeconfig(c.kubeconfig, c.APIServerURL(), adminIdentity); err != nil {
		return err
	}
	if c.restConfig, err = clientcmd.BuildConfigFromFlags("", c.kubeconfig); err != nil {
		return err
	}
	c.restConfig.QPS, c.restConfig.Burst = 50, 100
	if c.client, err = kubernetes.NewForConfig(c.restConfig); err != nil {
		return err
	}
	if err := c.pushSandboxImage(ctx); err != nil {
		return err
	}
	c.registryURL = c.tb.RegistryURL()
	if c.cfg.registryTLS {
		if err := c.pki.serverCert(registryCertFile, registryKeyFile, "registry", []net.IP{net.ParseIP(c.tb.RegistryURL()[len("http://"):strings.LastIndex(c.tb.RegistryURL(), ":")])}); err != nil {
			return err
		}
		reg, err := c.tb.StartTLSRegistry(ctx, c.pki.path(registryCertFile), c.pki.path(registryKeyFile))
		if err != nil {
			return err
		}
		c.registryURL = reg.URL()
	}
	if err := c.startControlPlane(ctx); err != nil {
		return err
	}
	if err := c.routePods(ctx); err != nil {
		return err
	}
	removeStaleCgroups()
	for _, n := range c.nodes {
		if err := os.MkdirAll(n.dir, 0o755); err != nil {
			return err
		}
		if err := n.start(ctx); err != nil {
			return fmt.Errorf("node %s: %w", n.Name(), err)
		}
	}
	return c.waitReady(ctx)
}

// APIServerURL is the API server's address, reachable from the isolated namespace and from
// every node.
func (c *Cluster) APIServerURL() string {
	return "https://" + net.JoinHostPort(c.tb.SwitchAddr().String(), strconv.Itoa(APIServerPort))
}

// APIServerHost is the API server's IP, what pods are given as KUBERNETES_SERVICE_HOST.
func (c *Cluster) APIServerHost() string { return c.tb.SwitchAddr().String() }

// InitialHostsTOML is the hosts.toml for registry.test every node has before Shoal: the
// registry's address, over plain HTTP, or over HTTPS trusting the cluster's CA (ca.crt, a file
// beside it) with WithRegistryTLS.
func (c *Cluster) InitialHostsTOML() []byte {
	url := c.registryURL
	if c.cfg.registryTLS {
		return fmt.Appendf(nil, "server = %q\nca = \"ca.crt\"\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"ca.crt\"\n", url, url)
	}
	return fmt.Appendf(nil, "server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", url, url)
}

// RegistryURL is where the nodes pull registry.test from.
func (c *Cluster) RegistryURL() string { return c.registryURL }

// CAFile is the cluster CA's certificate (PEM).
func (c *Cluster) CAFile() string { return c.pki.path(caFile) }

// Kubeconfig is the path of a cluster-admin kubeconfig (for helm and kubectl).
func (c *Cluster) Kubeconfig() string { return c.kubeconfig }

// RESTConfig is a cluster-admin client configuration.
func (c *Cluster) RESTConfig() *rest.Config { return rest.CopyConfig(c.restConfig) }

// Client is a cluster-admin clientset.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// Nodes are the cluster's nodes, in testbed order.
func (c *Cluster) Nodes() []*Node { return c.nodes }

// Testbed is the network and registry under the cluster.
func (c *Cluster) Testbed() *testbed.Testbed { return c.tb }

// Dir is the cluster's directory (logs of every component).
func (c *Cluster) Dir() string { return c.dir }

// KubectlBinary is the kubectl built with the cluster's components.
func (c *Cluster) KubectlBinary() string { return c.binary("kubectl") }

func (c *Cluster) startControlPlane(ctx context.Context) error {
	ports, err := harness.FreePorts(4)
	if err != nil {
		return err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.etcd, err = harness.StartProcess("etcd", filepath.Join(c.dir, "etcd.log"), c.logger, c.binary("etcd"),
		"--name=local", "--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=local="+peerURL, "--listen-metrics-urls=", "--log-level=warn")
	if err != nil {
		return err
	}
	if err := c.etcd.WaitReady(ctx, "etcd answers", func(ctx context.Context) error { return httpOK(ctx, http.DefaultClient, etcdURL+"/health", "") }); err != nil {
		return err
	}
	p := c.pki.path
	c.apiserver, err = harness.StartProcess("kube-apiserver", filepath.Join(c.dir, "kube-apiserver.log"), c.logger, c.binary("kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address="+c.APIServerHost(), "--advertise-address="+c.APIServerHost(), "--secure-port="+strconv.Itoa(APIServerPort),
		"--tls-cert-file="+p(apiCertFile), "--tls-private-key-file="+p(apiKeyFile), "--client-ca-file="+p(caFile),
		"--token-auth-file="+p(tokenFile),
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p(saPubFile), "--service-account-signing-key-file="+p(saKeyFile),
		"--service-cluster-ip-range="+ServiceCIDR,
		"--kubelet-preferred-address-types=InternalIP",
		"--kubelet-client-certificate="+p(kubeletClientCert), "--kubelet-client-key="+p(kubeletClientKey),
		"--allow-privileged=true", "--profiling=false")
	if err != nil {
		return err
	}
	hc, err := c.httpClient()
	if err != nil {
		return err
	}
	if err := c.apiserver.WaitReady(ctx, "the API server is ready", func(ctx context.Context) error {
		return httpOK(ctx, hc, c.APIServerURL()+"/readyz", c.pki.tokens[adminIdentity])
	}); err != nil {
		return err
	}
	c.controllerManager, err = harness.StartProcess("kube-controller-manager", filepath.Join(c.dir, "kube-controller-manager.log"), c.logger, c.binary("kube-controller-manager"),
		"--kubeconfig="+c.kubeconfig, "--authentication-kubeconfig="+c.kubeconfig, "--authorization-kubeconfig="+c.kubeconfig,
		"--root-ca-file="+p(caFile), "--service-account-private-key-file="+p(saKeyFile),
		"--use-service-account-credentials=false", "--leader-elect=false",
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(ports[2]))
	if err != nil {
		return err
	}
	c.scheduler, err = harness.StartProcess("kube-scheduler", filepath.Join(c.dir, "kube-scheduler.log"), c.logger, c.binary("kube-scheduler"),
		"--kubeconfig="+c.kubeconfig, "--authentication-kubeconfig="+c.kubeconfig, "--authorization-kubeconfig="+c.kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(ports[3]))
	return err
}

// httpClient trusts the cluster's CA.
func (c *Cluster) httpClient() (*http.Client, error) {
	pemData, err := os.ReadFile(c.pki.path(caFile))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pemData)
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}, nil
}

func httpOK(ctx context.Context, hc *http.Client, url, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// routePods routes each node's pod subnet to that node, from the isolated namespace (where
// the API server is), the registry's and every other node, and lets the nodes forward.
func (c *Cluster) routePods(ctx context.Context) error {
	for _, n := range c.nodes {
		if err := run(ctx, "ip", "route", "add", n.podCIDR.String(), "via", n.IP().String()); err != nil {
			return err
		}
		// Pods reach the registry directly (the controller resolves images there).
		if err := run(ctx, "nsenter", "--net="+c.tb.RegistryNetns(), "--", "ip", "route", "add", n.podCIDR.String(), "via", n.IP().String()); err != nil {
			return err
		}
		if err := run(ctx, "nsenter", "--net="+n.tb.Netns(), "--", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
			return err
		}
		for _, m := range c.nodes {
			if m == n {
				continue
			}
			if err := run(ctx, "nsenter", "--net="+n.tb.Netns(), "--", "ip", "route", "add", m.podCIDR.String(), "via", m.IP().String()); err != nil {
				return err
			}
		}
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = harness.ChildEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, out)
	}
	return nil
}

// pushSandboxImage builds the pause program and pushes the sandbox image every node's
// containerd is configured with.
func (c *Cluster) pushSandboxImage(ctx context.Context) error {
	bin := filepath.Join(c.dir, "pause")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "github.com/shoal-dev/shoal/test/cluster/pause")
	build.Env = append(harness.ChildEnv(), "CGO_ENABLED=0", "GOPROXY=off") // the standard library alone
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build the pause program: %w: %s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	layer, err := imagebuild.Layer([]imagebuild.File{{Path: "pause", Mode: 0o755, Data: data}})
	if err != nil {
		return err
	}
	img, err := imagebuild.Image(runtime.GOARCH, []v1.Layer{layer}, func(cfg *v1.Config) { cfg.Entrypoint = []string{"/pause"} })
	if err != nil {
		return err
	}
	_, err = harness.PushV1Image(ctx, c.tb.RegistryHost(), SandboxImage, img)
	return err
}

// waitReady waits until every node is Ready and the default namespace's ServiceAccount exists
// (the ServiceAccount admission refuses pods until it does).
func (c *Cluster) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		ready, err := c.readyNodes(ctx)
		if err == nil && ready == len(c.nodes) {
			if _, err = c.client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err == nil {
				return nil
			}
		}
		for _, n := range c.nodes {
			if n.kubelet.Exited() {
				return fmt.Errorf("kubelet of %s exited:\n%s", n.Name(), n.kubelet.LogTail())
			}
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("cluster: %d of %d nodes Ready after 2m; kubelet logs under %s", ready, len(c.nodes), c.dir)
			if err != nil {
				return fmt.Errorf("%s (last error: %w)", msg, err)
			}
			return errors.New(msg)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (c *Cluster) readyNodes(ctx context.Context) (int, error) {
	list, err := c.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, err
	}
	ready := 0
	for _, n := range list.Items {
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
				ready++
			}
		}
	}
	return ready, nil
}

// Close stops every node and the control plane, and tears the testbed down. It is safe to
// call more than once.
func (c *Cluster) Close() error {
	var errs []error
	for _, n := range c.nodes {
		errs = append(errs, n.close())
	}
	c.nodes = nil
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, p := range []**harness.Process{&c.scheduler, &c.controllerManager, &c.apiserver, &c.etcd} {
		if *p != nil {
			if err := (*p).Stop(ctx); err != nil {
				c.logger.Info("stop", "err", err) // the scheduler exits 1 on SIGTERM
			}
			*p = nil
		}
	}
	if c.tb != nil {
		errs = append(errs, c.tb.Close())
		c.tb = nil
	}
	return errors.Join(errs...)
}

// removeStaleCgroups removes the cgroup subtrees of clusters whose process is gone (a run that
// was killed before Close).
func removeStaleCgroups() {
	hs, err := cgroupMounts("cgroup", "cgroup2")
	if err != nil {
		return
	}
	for _, h := range hs {
		entries, _ := os.ReadDir(h)
		for _, e := range entries {
			var pid int
			var node string
			if _, err := fmt.Sscanf(e.Name(), "shoal%d-%s", &pid, &node); err != nil || !e.IsDir() {
				continue
			}
			if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
				continue
			}
			_ = removeCgroups("/" + e.Name())
		}
	}
}
