package testbed

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"github.com/shoal-dev/shoal/test/harness"
)

// Node is one simulated node: a network namespace with its own loopback and address, and the
// processes the testbed runs in it.
type Node struct {
	tb         *Testbed
	index      int
	name       string
	netns      string // path under /run/netns
	switchLink string
	ip         netip.Addr
	dir        string
	containerd *harness.Containerd

	mu     sync.Mutex
	agent  *harness.Agent
	stores int // agents started with a fresh store so far
}

// Index is the node's position in Testbed.Nodes.
func (n *Node) Index() int { return n.index }

// Name is "n<index>", as fetch results report it.
func (n *Node) Name() string { return n.name }

// IP is the node's address on the testbed network.
func (n *Node) IP() netip.Addr { return n.ip }

// Netns is the path of the node's network namespace, for nsenter --net.
func (n *Node) Netns() string { return n.netns }

// P2PAddr is the --p2p-addr the node's agent listens on for peers.
func (n *Node) P2PAddr() string { return net.JoinHostPort(n.ip.String(), strconv.Itoa(P2PPort)) }

// SwarmArgs are the agent flags that join this node to a swarm of all testbed nodes:
// --p2p-addr <this node> --peers <every node>. Pass them to StartAgent.
func (n *Node) SwarmArgs() []string {
	return []string{"--p2p-addr", n.P2PAddr(), "--peers", n.tb.Peers()}
}

// MirrorBlobURL is the URL a client inside the node GETs blob digest of repo through the
// node's agent with, as containerd would ask (?ns= names the registry).
func (n *Node) MirrorBlobURL(repo, digest string) string {
	return fmt.Sprintf("http://%s/v2/%s/blobs/%s?ns=%s", MirrorAddr, repo, digest, RegistryName)
}

// HostsDir is the containerd config_path of the node, where its agent writes hosts.toml.
func (n *Node) HostsDir() string { return filepath.Join(n.dir, "certs.d") }

// StartAgent starts `shoal agent` in the node with an empty store of its own and waits until
// it is ready. The testbed sets the mirror (127.0.0.1:5001 in the node), the metrics address
// (<node IP>:9091, which this process polls), --data-dir, --cache-size 0, the registry
// (registry.test mapped to the testbed's registry), hosts.toml writing when the node runs
// containerd, and info-level JSON logs; args come after these, so they may override them, and
// carry what the scenario needs (for a swarm: SwarmArgs). A previous agent of the node that
// still runs is killed first; Agent().Restart starts an agent again on its own store instead.
func (n *Node) StartAgent(ctx context.Context, args ...string) (*harness.Agent, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent != nil {
		if err := n.agent.Kill(); err != nil { // no-op when it has exited already
			return nil, err
		}
	}
	bin := n.tb.cfg.shoalBinary
	if bin == "" {
		return nil, fmt.Errorf("node %s: no shoal binary: set %s (harness.BuildShoalFirst) or use WithShoalBinary", n.name, harness.ShoalBinaryEnv)
	}
	hostsDir := ""
	extra := []string{"--containerd-config", "", "--log-level", "info", "--log-format", "json"}
	if n.containerd != nil {
		hostsDir = n.HostsDir()
		extra = append(extra, "--runtime-endpoint", "unix://"+n.containerd.Socket())
	}
	extra = append(extra, args...)
	n.stores++
	agentDir := filepath.Join(n.dir, "agent-"+strconv.Itoa(n.stores))
	a, err := harness.StartAgent(ctx, harness.AgentConfig{
		Binary:            bin,
		DataDir:           filepath.Join(agentDir, "data"),
		LogDir:            agentDir,
		HostsDir:          hostsDir,
		MirrorRegistries:  []string{RegistryName},
		RegistryEndpoints: map[string]string{RegistryName: cmp.Or(n.tb.agentUpstream, n.tb.RegistryURL())},
		CacheSize:         "0",
		MirrorAddr:        MirrorAddr,
		MetricsAddr:       net.JoinHostPort(n.ip.String(), strconv.Itoa(MetricsPort)),
		ExtraArgs:         extra,
	}, harness.WithNetns(n.netns), harness.WithLogger(n.tb.cfg.logger.With("node", n.name)))
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", n.name, err)
	}
	n.agent = a
	return a, nil
}

// Agent is the node's current agent (nil before StartAgent): Kill, Stop, Restart, Metrics,
// PID, LogPath.
func (n *Node) Agent() *harness.Agent {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.agent
}

// StopAgent stops the node's agent (SIGTERM, then SIGKILL after a grace period), if any.
func (n *Node) StopAgent(ctx context.Context) error {
	a := n.Agent()
	if a == nil {
		return nil
	}
	return a.Stop(ctx)
}

// AgentUsage reads the CPU time and peak memory of the node's running agent.
func (n *Node) AgentUsage() (Usage, error) {
	a := n.Agent()
	if a == nil {
		return Usage{}, fmt.Errorf("node %s: no agent", n.name)
	}
	return ProcessUsage(a.PID())
}

// Containerd is the node's containerd (nil unless the testbed was built WithContainerd).
func (n *Node) Containerd() *harness.Containerd { return n.containerd }

// PullImage pulls ref through the node containerd's CRI image service, as kubelet would.
func (n *Node) PullImage(ctx context.Context, ref string) (string, error) {
	if n.containerd == nil {
		return "", fmt.Errorf("node %s runs no containerd (build the testbed WithContainerd)", n.name)
	}
	return n.containerd.CRI().PullImage(ctx, ref)
}

// Traffic reads the node link's counters.
func (n *Node) Traffic() (Traffic, error) { return linkTraffic(n.switchLink) }

// Command returns a command that runs inside the node's network namespace (through nsenter,
// which keeps the file system and cgroups as they are, and execs name in place). It is killed
// when ctx ends, and if this process dies.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.netns, "--", name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// DialContext connects from inside the node (from its loopback or address), e.g. to its
// mirror at 127.0.0.1:5001, without crossing this node's shaped link for loopback targets.
func (n *Node) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(n.netns, func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// Listen opens a listener inside the node, e.g. on its address to play a peer, or on its
// loopback. The listener stays in the node's namespace whichever thread accepts.
func (n *Node) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := inNetns(n.netns, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

func (n *Node) startContainerd(ctx context.Context) error {
	opts := []harness.Option{harness.WithNetns(n.netns), harness.WithLogger(n.tb.cfg.logger.With("node", n.name))}
	if bin := n.tb.cfg.containerdBinary; bin != "" {
		opts = append(opts, harness.WithBinary(bin))
	}
	c, err := harness.StartContainerd(ctx, filepath.Join(n.dir, "containerd"), n.HostsDir(), opts...)
	if err != nil {
		return err
	}
	n.containerd = c
	return nil
}

// close stops the agent and containerd.
func (n *Node) close() error {
	var errs []error
	if a := n.Agent(); a != nil {
		errs = append(errs, a.Close())
	}
	if n.containerd != nil {
		errs = append(errs, n.containerd.Close())
	}
	return errors.Join(errs...)
}
