package testbed

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

const (
	// RegistryName is the made-up registry the agents mirror; images are named
	// registry.test/<repo>, and --registry-endpoint maps it to the testbed's registry.
	RegistryName = "registry.test"
	// MirrorAddr is where each agent's mirror listens, on its own node's loopback.
	MirrorAddr = "127.0.0.1:5001"
	// P2PPort is the agents' peer port on their node addresses (--p2p-addr).
	P2PPort = 7070
	// MetricsPort is the agents' /metrics and /readyz port on their node addresses.
	MetricsPort = 9091
	// registryPort is the registry's port on 10.99.0.1.
	registryPort = 5000
	// dirPrefix names the testbed's temporary directory: shoal-testbed-<pid>-<random>.
	dirPrefix = "shoal-testbed-"
)

// Rate is a link rate in bits per second, as tc counts it.
type Rate int64

// Mbit is one megabit per second (10^6 bit/s, like tc's "mbit").
const Mbit Rate = 1_000_000

// BytesPerSecond is the rate in bytes per second.
func (r Rate) BytesPerSecond() float64 { return float64(r) / 8 }

// String formats the rate as tc would, e.g. "100mbit".
func (r Rate) String() string {
	if r%Mbit == 0 {
		return strconv.FormatInt(int64(r/Mbit), 10) + "mbit"
	}
	return strconv.FormatInt(int64(r), 10) + "bit"
}

// Option tunes New.
type Option func(*config)

type config struct {
	nodeRate         Rate
	registryRate     Rate
	containerd       bool
	containerdBinary string
	registryUser     string // WithRegistryAuth
	registryPassword string
	logger           *slog.Logger
	shoalBinary      string
	fetchBinary      string
	keepDir          bool
}

// WithNodeRate shapes every node's link to rate in each direction (default: unshaped).
func WithNodeRate(rate Rate) Option { return func(c *config) { c.nodeRate = rate } }

// WithRegistryRate shapes the registry's link to rate in each direction (default: unshaped).
func WithRegistryRate(rate Rate) Option { return func(c *config) { c.registryRate = rate } }

// WithContainerd starts a containerd with the CRI plugin in every node; its config_path is the
// node's hosts directory, which the node's agent writes hosts.toml into.
func WithContainerd() Option { return func(c *config) { c.containerd = true } }

// WithContainerdBinary is WithContainerd with the containerd executable at path (default:
// Debian's 1.6), e.g. harness.Containerd2Binary().
func WithContainerdBinary(path string) Option {
	return func(c *config) { c.containerd, c.containerdBinary = true, path }
}

// WithRegistryAuth makes the registry demand user and password of every request (htpasswd);
// push with Registry().Auth(). Agents get no credentials for it.
func WithRegistryAuth(user, password string) Option {
	return func(c *config) { c.registryUser, c.registryPassword = user, password }
}

// WithLogger reports what the testbed does (namespaces, processes) to l.
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// WithShoalBinary sets the shoal executable the agents run (default: $SHOAL_BINARY, see
// harness.BuildShoalFirst). Only Node.StartAgent needs it.
func WithShoalBinary(path string) Option { return func(c *config) { c.shoalBinary = path } }

// WithFetchBinary sets the hack/testbedfetch executable (default: $SHOAL_FETCH_BINARY, see
// BuildFetchFirst). Only Node.Fetch needs it.
func WithFetchBinary(path string) Option { return func(c *config) { c.fetchBinary = path } }

// WithKeepDir makes Close keep the testbed's directory (agent, registry and containerd logs,
// stores) for a post-mortem, renamed to shoal-testbed-kept-*, which stale-run cleanup leaves
// alone. Close logs its path.
func WithKeepDir() Option { return func(c *config) { c.keepDir = true } }

// Testbed is a running cluster of simulated nodes and a registry. Close tears it down.
type Testbed struct {
	cfg      config
	names    names
	dir      string
	registry *harness.Registry
	nodes    []*Node

	// ctx ends with Close, killing fetches still running.
	ctx    context.Context
	cancel context.CancelFunc

	agentUpstream string // where agents find registry.test; "" = the registry itself

	closeOnce sync.Once
	closeErr  error
	undo      []func() error // network and directory teardown, run last to first
}

// New builds a testbed of n nodes: namespaces, links, shaping, the registry and (WithContainerd)
// one containerd per node. No agent runs until Node.StartAgent. It must run inside
// harness.RunIsolated's namespace (a test's TestMain: harness.IsolateNetwork). On error
// everything already built is torn down.
func New(ctx context.Context, n int, opts ...Option) (*Testbed, error) {
	cfg := config{logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, opt := range opts {
		opt(&cfg)
	}
	cfg.shoalBinary = cmp.Or(cfg.shoalBinary, os.Getenv(harness.ShoalBinaryEnv))
	cfg.fetchBinary = cmp.Or(cfg.fetchBinary, os.Getenv(FetchBinaryEnv))
	switch {
	case !harness.InIsolatedNetwork():
		return nil, errors.New("testbed: not inside an isolated network namespace: run under harness.RunIsolated (tests: harness.IsolateNetwork in TestMain)")
	case n < 1 || n > 1000:
		return nil, fmt.Errorf("testbed: %d nodes: want 1 to 1000", n)
	}
	if busy, err := hasRoute(ctx); err != nil {
		return nil, err
	} else if busy {
		return nil, fmt.Errorf("testbed: %s is already routed in this namespace: another testbed is running here", subnet)
	}
	removeStale(ctx, cfg.logger)

	nm, err := newNames()
	if err != nil {
		return nil, err
	}
	tb := &Testbed{cfg: cfg, names: nm}
	tb.ctx, tb.cancel = context.WithCancel(context.Background())
	if err := tb.build(ctx, n); err != nil {
		return nil, errors.Join(err, tb.Close())
	}
	return tb, nil
}

func (tb *Testbed) build(ctx context.Context, n int) error {
	log := tb.cfg.logger
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", dirPrefix, os.Getpid()))
	if err != nil {
		return fmt.Errorf("create testbed directory: %w", err)
	}
	tb.dir = dir
	tb.undo = append(tb.undo, func() error {
		if !tb.cfg.keepDir {
			return os.RemoveAll(dir)
		}
		kept := filepath.Join(filepath.Dir(dir), dirPrefix+"kept-"+strings.TrimPrefix(filepath.Base(dir), dirPrefix))
		if err := os.Rename(dir, kept); err != nil {
			return fmt.Errorf("keep testbed directory: %w", err)
		}
		log.Info("testbed directory kept", "dir", kept)
		return nil
	})

	br := tb.names.bridge()
	if err := run(ctx, "ip", "link", "add", br, "type", "bridge"); err != nil {
		return err
	}
	tb.undo = append(tb.undo, func() error { return deleteLink(br) })
	if err := run(ctx, "ip", "addr", "add", switchIP.String()+"/"+strconv.Itoa(subnet.Bits()), "dev", br); err != nil {
		return err
	}
	if err := run(ctx, "ip", "link", "set", br, "up"); err != nil {
		return err
	}
	if err := addNamespace(ctx, tb.names.registryNetns(), tb.names.registryLink(), br, registryIP, tb.cfg.registryRate, &tb.undo); err != nil {
		return fmt.Errorf("registry namespace: %w", err)
	}
	for i := range n {
		node := &Node{
			tb:         tb,
			index:      i,
			name:       "n" + strconv.Itoa(i),
			netns:      filepath.Join(netnsDir, tb.names.nodeNetns(i)),
			switchLink: tb.names.nodeSwitchLink(i),
			ip:         nodeIP(i),
			dir:        filepath.Join(dir, "n"+strconv.Itoa(i)),
		}
		if err := addNamespace(ctx, tb.names.nodeNetns(i), node.switchLink, br, node.ip, tb.cfg.nodeRate, &tb.undo); err != nil {
			return fmt.Errorf("node %d namespace: %w", i, err)
		}
		tb.nodes = append(tb.nodes, node)
	}
	log.Info("testbed network up", "nodes", n, "netns", tb.names.ns+"-*", "node_rate", tb.cfg.nodeRate, "registry_rate", tb.cfg.registryRate)

	registryOpts := []harness.Option{
		harness.WithNetns(filepath.Join(netnsDir, tb.names.registryNetns())),
		harness.WithListenAddr(tb.RegistryHost()),
		harness.WithLogger(log),
	}
	if tb.cfg.registryUser != "" {
		registryOpts = append(registryOpts, harness.WithBasicAuth(tb.cfg.registryUser, tb.cfg.registryPassword))
	}
	tb.registry, err = harness.StartRegistry(ctx, filepath.Join(dir, "registry"), registryOpts...)
	if err != nil {
		return fmt.Errorf("start registry: %w", err)
	}
	if tb.cfg.containerd {
		if err := eachNode(tb.nodes, func(n *Node) error { return n.startContainerd(ctx) }); err != nil {
			return err
		}
	}
	return nil
}

// Close stops every process the testbed started (agents, containerd, the registry, fetches),
// deletes its namespaces, links and directory. It is safe to call more than once.
func (tb *Testbed) Close() error {
	tb.closeOnce.Do(func() {
		tb.cancel()
		errs := []error{eachNode(tb.nodes, func(n *Node) error { return n.close() })}
		if tb.registry != nil {
			errs = append(errs, tb.registry.Close())
		}
		for i := len(tb.undo) - 1; i >= 0; i-- {
			errs = append(errs, tb.undo[i]())
		}
		tb.closeErr = errors.Join(errs...)
		tb.cfg.logger.Info("testbed torn down", "netns", tb.names.ns+"-*", "err", tb.closeErr)
	})
	return tb.closeErr
}

// eachNode runs fn for all nodes at once and joins the errors.
func eachNode(nodes []*Node, fn func(*Node) error) error {
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			if err := fn(n); err != nil {
				errs[i] = fmt.Errorf("node %s: %w", n.name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Nodes are the nodes, in index order.
func (tb *Testbed) Nodes() []*Node { return tb.nodes }

// Node is node i.
func (tb *Testbed) Node(i int) *Node { return tb.nodes[i] }

// Dir is the testbed's temporary directory (logs, stores, registry storage); Close removes it
// (or renames it: WithKeepDir).
func (tb *Testbed) Dir() string { return tb.dir }

// Registry is the registry, for its access log (BlobGETs, Requests, Sync).
func (tb *Testbed) Registry() *harness.Registry { return tb.registry }

// RegistryHost is the registry's address, "10.99.0.1:5000".
func (tb *Testbed) RegistryHost() string {
	return net.JoinHostPort(registryIP.String(), strconv.Itoa(registryPort))
}

// TLSRegistryPort is where StartTLSRegistry's registry listens on the registry's address.
const TLSRegistryPort = 5443

// StartTLSRegistry starts a second registry in the registry's namespace, on port
// TLSRegistryPort, serving the same content over HTTPS with the PEM certificate and key given
// (which must be valid for the registry's address). Pushes keep going to the plain one. It stops
// with the testbed.
func (tb *Testbed) StartTLSRegistry(ctx context.Context, certFile, keyFile string) (*harness.Registry, error) {
	reg, err := harness.StartRegistry(ctx, filepath.Join(tb.dir, "registry-tls"),
		harness.WithNetns(tb.RegistryNetns()),
		harness.WithListenAddr(net.JoinHostPort(registryIP.String(), strconv.Itoa(TLSRegistryPort))),
		harness.WithStorage(filepath.Join(tb.dir, "registry", "storage")),
		harness.WithTLS(certFile, keyFile),
		harness.WithLogger(tb.cfg.logger))
	if err != nil {
		return nil, err
	}
	tb.undo = append(tb.undo, reg.Close)
	return reg, nil
}

// RegistryNetns is the path of the registry's network namespace.
func (tb *Testbed) RegistryNetns() string { return filepath.Join(netnsDir, tb.names.registryNetns()) }

// RegistryURL is the registry's base URL, as agents are told it in --registry-endpoint.
func (tb *Testbed) RegistryURL() string { return "http://" + tb.RegistryHost() }

// SetAgentUpstream makes agents started from now on find registry.test at url instead of the
// registry, e.g. at a front that misbehaves (see ListenOnSwitch).
func (tb *Testbed) SetAgentUpstream(url string) { tb.agentUpstream = url }

// SwitchAddr is this process's own address on the testbed's bridge, which every node reaches:
// where a server the test runs for the nodes (an API server, a registry front) listens.
func (tb *Testbed) SwitchAddr() netip.Addr { return switchIP }

// ListenOnSwitch opens a TCP listener on this process's own address on the testbed's bridge,
// which every node reaches (through its shaped link), e.g. for a registry front that
// misbehaves. It stays inside the isolated namespace the testbed runs in.
func (tb *Testbed) ListenOnSwitch() (net.Listener, error) {
	return net.Listen("tcp", net.JoinHostPort(switchIP.String(), "0"))
}

// RegistryBlobURL is where a client inside a node GETs blob d of repo straight from the registry.
func (tb *Testbed) RegistryBlobURL(repo string, d v1.Hash) string {
	return fmt.Sprintf("%s/v2/%s/blobs/%s", tb.RegistryURL(), repo, d)
}

// RegistryTraffic reads the registry link's counters: Sent is what the registry served.
func (tb *Testbed) RegistryTraffic() (Traffic, error) {
	return linkTraffic(tb.names.registryLink())
}

// NodeTraffic reads every node link's counters at once, in node order.
func (tb *Testbed) NodeTraffic() ([]Traffic, error) {
	stats, err := readLinkStats()
	if err != nil {
		return nil, err
	}
	out := make([]Traffic, len(tb.nodes))
	for i, n := range tb.nodes {
		s, ok := stats[n.switchLink]
		if !ok {
			return nil, fmt.Errorf("link %s not found", n.switchLink)
		}
		out[i] = s.traffic()
	}
	return out, nil
}

// Peers is the --peers value naming every node: "10.99.0.10:7070,10.99.0.11:7070,...".
func (tb *Testbed) Peers() string {
	addrs := make([]string, len(tb.nodes))
	for i, n := range tb.nodes {
		addrs[i] = n.P2PAddr()
	}
	return strings.Join(addrs, ",")
}

// PushBlob pushes size random bytes generated from seed (the same seed gives the same blob)
// to the registry as a layer of repo, e.g. "bench/blob", and returns its digest.
func (tb *Testbed) PushBlob(ctx context.Context, repo string, size int64, seed uint64) (v1.Hash, error) {
	return harness.PushBlob(ctx, tb.RegistryHost(), repo, size, seed)
}
