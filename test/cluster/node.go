package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// Node is one Kubernetes node: the testbed node's network namespace, a private mount namespace
// with the node's own /run, /var, /etc/containerd and kernel settings, a cgroup subtree,
// containerd with the CRI plugin and CNI, and a kubelet.
type Node struct {
	c          *Cluster
	tb         *testbed.Node
	dir        string
	podCIDR    netip.Prefix
	cgroupRoot string // e.g. /shoal1234-n0, in every cgroup v1 hierarchy
	holder     *harness.Process
	mountns    string // /proc/PID/ns/mnt of holder
	mountnsID  string // its identity, mnt:[inode]
	containerd *harness.Containerd
	kubelet    *harness.Process
}

// Name is the node's Kubernetes name (also the testbed's: n0, n1, ...).
func (n *Node) Name() string { return n.tb.Name() }

// IP is the node's address (its InternalIP).
func (n *Node) IP() netip.Addr { return n.tb.IP() }

// Testbed is the testbed node under this node, for traffic counters and commands in its
// network namespace.
func (n *Node) Testbed() *testbed.Node { return n.tb }

// Containerd is the node's containerd.
func (n *Node) Containerd() *harness.Containerd { return n.containerd }

// Dir is the node's directory: its /var, /etc/containerd and logs live under it.
func (n *Node) Dir() string { return n.dir }

// HostsDir is the node's containerd hosts directory as seen from outside the node
// (/etc/containerd/certs.d inside it).
func (n *Node) HostsDir() string { return filepath.Join(n.dir, "etc-containerd", "certs.d") }

// VarDir is the node's /var as seen from outside the node.
func (n *Node) VarDir() string { return filepath.Join(n.dir, "var") }

// kernelSettings are the host sysctls kubelet sets at start-up, with the values it wants. Inside
// the node they are files bind-mounted over /proc/sys, so the machine's own values never change.
var kernelSettings = []struct{ path, value string }{
	{"vm/overcommit_memory", "1"},
	{"vm/panic_on_oom", "0"},
	{"kernel/panic", "10"},
	{"kernel/panic_on_oops", "1"},
	{"kernel/keys/root_maxkeys", "1000000"},
	{"kernel/keys/root_maxbytes", "25000000"},
}

// start prepares the node's directories, mount namespace, cgroups, CNI and containerd, and
// starts its kubelet.
func (n *Node) start(ctx context.Context) error {
	for _, d := range []string{"var/lib", "var/log", "var/tmp", "etc-containerd/certs.d", "containerd/state", "containerd/cni/bin", "containerd/cni/net.d", "sysctl", "cni-ipam", "kubelet"} {
		if err := os.MkdirAll(filepath.Join(n.dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Symlink("/run", filepath.Join(n.dir, "var", "run")); err != nil {
		return err
	}
	if err := n.writeHostsConfig(); err != nil {
		return err
	}
	if err := n.writeCNI(); err != nil {
		return err
	}
	if err := n.makeCgroups(); err != nil {
		return err
	}
	if err := n.startMountNamespace(ctx); err != nil {
		return err
	}
	if err := n.startContainerd(ctx); err != nil {
		return err
	}
	return n.startKubelet()
}

// writeHostsConfig is the node's own registry configuration before Shoal: registry.test is
// served by the testbed's registry, over plain HTTP. The agent adds itself as a mirror in front.
func (n *Node) writeHostsConfig() error {
	dir := filepath.Join(n.HostsDir(), RegistryName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if n.c.cfg.registryTLS {
		ca, err := os.ReadFile(n.c.CAFile())
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o644); err != nil {
			return err
		}
	}
	return os.WriteFile(n.RegistryHostsFile(), n.c.InitialHostsTOML(), 0o644)
}

// RegistryHostsFile is the path, seen from outside the node, of containerd's hosts.toml for
// registry.test.
func (n *Node) RegistryHostsFile() string {
	return filepath.Join(n.HostsDir(), RegistryName, "hosts.toml")
}

// writeCNI gives the node a bridge network for its pods (Debian's bridge and host-local
// plugins): one /24 per node, the node as the pods' gateway, routes between nodes set by the
// cluster. No masquerading, so no iptables: every address in the cluster is routed.
func (n *Node) writeCNI() error {
	entries, err := os.ReadDir(cniPluginDir)
	if err != nil {
		return fmt.Errorf("CNI plugins (apt install containernetworking-plugins): %w", err)
	}
	for _, e := range entries {
		if err := os.Symlink(filepath.Join(cniPluginDir, e.Name()), filepath.Join(n.dir, "containerd", "cni", "bin", e.Name())); err != nil {
			return err
		}
	}
	gateway := n.podCIDR.Addr().Next()
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "shoal-local",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": %q, "gateway": %q}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": %q
    }
  }]
}
`, n.podCIDR.String(), gateway.String(), filepath.Join(n.dir, "cni-ipam"))
	return os.WriteFile(filepath.Join(n.dir, "containerd", "cni", "net.d", "10-shoal-local.conflist"), []byte(conf), 0o644)
}

// cgroupHierarchies lists the mount points of the machine's cgroup v1 hierarchies.
func cgroupHierarchies() ([]string, error) { return cgroupMounts("cgroup") }

// cgroupMounts lists the mount points of the cgroup file systems of the given types.
func cgroupMounts(types ...string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// mount ID, parent, major:minor, root, mount point, options, optional..., "-", fstype, ...
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && slices.Contains(types, fields[i+1]) {
				dirs = append(dirs, fields[4])
			}
		}
	}
	return dirs, sc.Err()
}

// makeCgroups creates the node's cgroupRoot in every v1 hierarchy, as kubelet requires; cpuset
// needs its CPUs and memory nodes copied from the parent before anything can join it.
func (n *Node) makeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	if len(hs) == 0 {
		return errors.New("no cgroup v1 hierarchy is mounted: the local cluster runs kubelet on cgroup v1")
	}
	for _, h := range hs {
		d := filepath.Join(h, n.cgroupRoot)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				continue // not the cpuset hierarchy
			}
			if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
				return fmt.Errorf("cgroup %s: %w", d, err)
			}
		}
	}
	return nil
}

// removeCgroups removes the node's cgroup subtree, deepest first, in every hierarchy (runc
// also creates it in the unified one); its processes must be gone.
func removeCgroups(root string) error {
	hs, err := cgroupMounts("cgroup", "cgroup2")
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		top := filepath.Join(h, root)
		var dirs []string
		_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// cgroupPIDs lists the processes in the node's cgroup subtree (its pods' containers).
func cgroupPIDs(root string) []int {
	pids, _ := procsUnder(root, func(string) bool { return true })
	return pids
}

// procsUnder lists the processes of the cgroups in the subtree root of the pids hierarchy whose
// directory name match accepts.
func procsUnder(root string, match func(name string) bool) ([]int, error) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return nil, err
	}
	for _, h := range hs {
		if filepath.Base(h) != "pids" {
			continue
		}
		var pids []int
		err := filepath.WalkDir(filepath.Join(h, root), func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() || !match(d.Name()) {
				return nil
			}
			data, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil // gone meanwhile
			}
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
		return pids, err
	}
	return nil, errors.New("no pids cgroup hierarchy")
}

// startMountNamespace starts the process that holds the node's mount namespace. In it: the
// inherited mounts under /run are detached (they would pin other nodes' namespaces) and a
// fresh tmpfs takes their place, with containerd's state directory at /run/containerd; the
// node's own directories cover /var and /etc/containerd; and kubelet's kernel settings are
// files of the node's.
func (n *Node) startMountNamespace(ctx context.Context) error {
	var script strings.Builder
	script.WriteString("set -e\n")
	script.WriteString(`awk '$5 ~ "^/run/" {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done` + "\n")
	script.WriteString("mount -t tmpfs -o mode=755 tmpfs /run\n")
	fmt.Fprintf(&script, "mkdir -p /run/containerd && mount --bind %q /run/containerd\n", filepath.Join(n.dir, "containerd", "state"))
	fmt.Fprintf(&script, "mount --bind %q /var\n", n.VarDir())
	fmt.Fprintf(&script, "mount --bind %q /etc/containerd\n", filepath.Join(n.dir, "etc-containerd"))
	for _, k := range kernelSettings {
		f := filepath.Join(n.dir, "sysctl", strings.ReplaceAll(k.path, "/", "."))
		if err := os.WriteFile(f, []byte(k.value+"\n"), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(&script, "mount --bind %q /proc/sys/%s\n", f, k.path)
	}
	ready := filepath.Join(n.dir, "mounts.ready")
	fmt.Fprintf(&script, "touch %q\nexec sleep 2147483647\n", ready)
	if err := os.MkdirAll("/etc/containerd", 0o755); err != nil {
		return err
	}
	var err error
	n.holder, err = harness.StartProcess("mounts-"+n.Name(), filepath.Join(n.dir, "mounts.log"), n.c.logger,
		"unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script.String())
	if err != nil {
		return err
	}
	if err := n.holder.WaitReady(ctx, "the node's mounts are set up", func(context.Context) error {
		_, err := os.Stat(ready)
		return err
	}); err != nil {
		return err
	}
	n.mountns = fmt.Sprintf("/proc/%d/ns/mnt", n.holder.PID())
	n.mountnsID, err = os.Readlink(n.mountns)
	return err
}

func (n *Node) startContainerd(ctx context.Context) error {
	opts := []harness.Option{
		harness.WithNetns(n.tb.Netns()),
		harness.WithMountNamespace(n.mountns),
		harness.WithLogger(n.c.logger.With("node", n.Name())),
		harness.WithBinary(n.c.cfg.containerdBinary),
		harness.WithConfigPath("/etc/containerd/certs.d"), // inside the node: its own etc-containerd
	}
	c, err := harness.StartContainerd(ctx, filepath.Join(n.dir, "containerd"), n.HostsDir(), opts...)
	if err != nil {
		return err
	}
	n.containerd = c
	// The agent reads containerd's configuration where a node keeps it, to check config_path.
	cfg, err := os.ReadFile(filepath.Join(n.dir, "containerd", "config.toml"))
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.dir, "etc-containerd", "config.toml"), cfg, 0o644)
}

// startKubelet writes the kubelet's configuration and starts it inside the node.
func (n *Node) startKubelet() error {
	kdir := filepath.Join(n.dir, "kubelet")
	kubeconfig := filepath.Join(kdir, "kubeconfig")
	if err := n.c.pki.kubeconfig(kubeconfig, n.c.APIServerURL(), "node/"+n.Name()); err != nil {
		return err
	}
	resolv := filepath.Join(kdir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("# no DNS in the local cluster\n"), 0o644); err != nil {
		return err
	}
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %q
containerRuntimeEndpoint: "unix://%s"
address: %q
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: %q
failSwapOn: false
podCIDR: %q
maxPods: 60
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
systemReserved:
  cpu: 100m
  memory: 256Mi
`, n.cgroupRoot, n.containerd.Socket(), n.IP().String(), n.c.pki.path(caFile), resolv, n.podCIDR.String())
	configPath := filepath.Join(kdir, "config.yaml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return err
	}
	args := []string{
		"--net=" + n.tb.Netns(), "--mount=" + n.mountns, "--", n.c.binary("kubelet"),
		"--config=" + configPath,
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + n.Name(),
		"--node-ip=" + n.IP().String(),
		"--node-labels=" + strings.Join(n.c.cfg.nodeLabels, ","),
		"--v=1",
	}
	var err error
	n.kubelet, err = harness.StartProcess("kubelet-"+n.Name(), filepath.Join(n.dir, "kubelet.log"), n.c.logger, "nsenter", args...)
	return err
}

// close stops everything on the node: the kubelet first (so that it restarts nothing), then
// containerd, then every process left in the node's mount namespace (shims) and cgroup subtree
// (the pods' containers), and removes the cgroups. Only processes the node started are signalled:
// those in its own namespace and cgroups.
func (n *Node) close() error {
	var errs []error
	if n.kubelet != nil {
		_ = n.kubelet.Kill()
	}
	// containerd is stopped as a process of the harness (SIGTERM, then reaped) before the sweep,
	// which would otherwise kill it under the harness's feet.
	if n.containerd != nil {
		errs = append(errs, n.containerd.Close())
	}
	if n.holder != nil {
		deadline := time.Now().Add(15 * time.Second)
		for {
			pids := append(mountNamespacePIDs(n.mountnsID), cgroupPIDs(n.cgroupRoot)...)
			if len(pids) == 0 {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("node %s: processes %v outlived SIGKILL", n.Name(), pids))
				break
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = n.holder.Kill()
	}
	if n.cgroupRoot != "" {
		errs = append(errs, removeCgroups(n.cgroupRoot))
	}
	return errors.Join(errs...)
}

// mountNamespacePIDs lists the processes in the mount namespace whose identity is want.
func mountNamespacePIDs(want string) []int {
	if want == "" {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var pids []int
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if got, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "mnt")); err == nil && got == want {
			pids = append(pids, pid)
		}
	}
	return pids
}

// AgentMetricsPort is the agent's metrics port on the node's address (the chart's default).
const AgentMetricsPort = 9091

// AgentMetrics scrapes the Shoal agent on the node, from inside the node's network namespace.
func (n *Node) AgentMetrics(ctx context.Context) (harness.Metrics, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: n.tb.DialContext}}
	url := fmt.Sprintf("http://%s/metrics", net.JoinHostPort(n.IP().String(), strconv.Itoa(AgentMetricsPort)))
	return harness.ScrapeMetrics(ctx, client, url)
}

// ContainerPIDs lists the processes of a container running on the node, by the container ID a
// pod's status gives (containerd://ID or ID alone): those in its cgroup.
func (n *Node) ContainerPIDs(containerID string) ([]int, error) {
	id := containerID[strings.LastIndex(containerID, "/")+1:]
	pids, err := procsUnder(n.cgroupRoot, func(name string) bool { return strings.HasSuffix(name, id) })
	if err == nil && len(pids) == 0 {
		err = fmt.Errorf("container %s has no processes on %s", id, n.Name())
	}
	return pids, err
}
