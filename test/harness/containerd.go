package harness

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// DefaultContainerdBinary is Debian's containerd 1.6.
const DefaultContainerdBinary = "/usr/bin/containerd"

// Containerd2Version is the containerd 2.x that hack/install-deps.sh builds.
const Containerd2Version = "v2.4.2"

// Containerd2Binary is the path of the containerd 2.x that hack/install-deps.sh builds into
// the cache, with its runc shim beside it; an error says how to get it when it is missing.
func Containerd2Binary() (string, error) {
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "containerd", Containerd2Version, "containerd")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("containerd %s: %w (run hack/install-deps.sh)", Containerd2Version, err)
	}
	return bin, nil
}

// Containerd is a containerd daemon with the CRI plugin whose root, state, sockets and runc
// root are under one directory, and whose registry hosts come from a certs.d directory
// (config_path), the way kubelet's pulls are configured on a node. Several can run side by
// side; they may share one hosts directory.
type Containerd struct {
	dir         string
	major       int // containerd's major version: 1 or 2
	root        string
	socket      string
	hostsDir    string
	configPath  string // config_path when it differs from hostsDir (WithConfigPath)
	snapshotter string
	proc        *process
	cri         *CRIClient
}

// StartContainerd starts containerd with its state under dir and
// plugins."io.containerd.grpc.v1.cri".registry.config_path = hostsDir, and waits until the
// CRI image service answers. No CNI configuration is needed: the CRI plugin starts without
// one (it only logs that pod networking is not ready), and image pulls do not use it.
func StartContainerd(ctx context.Context, dir, hostsDir string, opts ...Option) (*Containerd, error) {
	o := newOptions(DefaultContainerdBinary, opts)
	c := &Containerd{
		dir:      dir,
		root:     filepath.Join(dir, "root"),
		socket:   filepath.Join(dir, "state", "containerd.sock"),
		hostsDir: hostsDir,
	}
	c.configPath = o.configPath
	for _, d := range []string{c.root, filepath.Join(dir, "state"), filepath.Join(dir, "runc"), hostsDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create containerd directory: %w", err)
		}
	}
	c.snapshotter = o.snapshotter
	if c.snapshotter == "" {
		c.snapshotter = detectSnapshotter(dir)
	}
	var err error
	if c.major, err = majorVersion(ctx, o.binary); err != nil {
		return nil, err
	}
	config := c.config()
	if c.major >= 2 {
		config = c.configV3()
	}
	configPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("write containerd config: %w", err)
	}
	bin, args := inNamespaces(o.netns, o.mountns, o.binary, []string{"--config", configPath})
	// containerd starts its runc shim from PATH: the one built with it comes first, not another
	// version's (Debian's 1.6 shim is in /usr/bin and speaks an older protocol). env execs in
	// place, so the PID is still containerd's.
	args = append([]string{"PATH=" + filepath.Dir(o.binary) + ":" + os.Getenv("PATH"), bin}, args...)
	bin = "env"
	c.proc, err = startProcess("containerd", filepath.Join(dir, "containerd.log"), "", o.logger, bin, args...)
	if err != nil {
		return nil, err
	}
	c.cri, err = DialCRI(c.socket)
	if err != nil {
		_ = c.proc.kill()
		return nil, err
	}
	ready := func(ctx context.Context) error {
		if _, err := os.Stat(c.socket); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := c.cri.ListImages(ctx)
		return err
	}
	if err := c.proc.waitReady(ctx, "the CRI image service answers", ready); err != nil {
		_ = c.cri.Close()
		_ = c.proc.kill()
		return nil, err
	}
	return c, nil
}

func (c *Containerd) config() string {
	// Plugins that would touch paths outside dir (opt) or probe file systems we do not use
	// are disabled. The runtime settings only keep runc's state under dir should a test
	// ever run a container; pulls do not need them.
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = "%[3]s.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "registry.test/pause:3.9"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = %[4]q
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %[5]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[6]q
    conf_dir = %[7]q
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %[8]q
`,
		c.configArgs()...)
}

// configArgs are the paths both config formats fill in, in the order of their %[n] verbs:
// root, state, socket, snapshotter, runc root, CNI binaries, CNI configs, hosts directory.
func (c *Containerd) configArgs() []any {
	return []any{
		c.root, filepath.Join(c.dir, "state"), c.socket, c.snapshotter,
		filepath.Join(c.dir, "runc"), filepath.Join(c.dir, "cni", "bin"), filepath.Join(c.dir, "cni", "net.d"),
		cmp.Or(c.configPath, c.hostsDir),
	}
}

// configV3 is config() in containerd 2.x's format, whose CRI plugin is split in an image and a
// runtime part.
func (c *Containerd) configV3() string {
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = "%[3]s.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.cri.v1.images"]
  snapshotter = %[4]q
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.test/pause:3.9"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %[8]q

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        Root = %[5]q
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%[6]q]
    conf_dir = %[7]q

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`,
		c.configArgs()...)
}

// majorVersion asks the containerd binary for its version and returns the major number.
func majorVersion(ctx context.Context, bin string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return 0, fmt.Errorf("containerd version (%s --version): %w", bin, err)
	}
	// "containerd github.com/containerd/containerd/v2 v2.4.2 <commit>", or 1.6.20~ds1 on Debian
	for _, f := range strings.Fields(string(out)) {
		v := strings.TrimPrefix(f, "v")
		if major, _, ok := strings.Cut(v, "."); ok {
			if n, err := strconv.Atoi(major); err == nil && n > 0 {
				return n, nil
			}
		}
	}
	return 0, fmt.Errorf("containerd version: no version in %q", strings.TrimSpace(string(out)))
}

// Major is containerd's major version: 1 or 2.
func (c *Containerd) Major() int { return c.major }

// detectSnapshotter returns "overlayfs" when an overlay mount works in dir, else "native".
// containerd would skip its overlayfs plugin on such a file system and every pull would fail.
func detectSnapshotter(dir string) string {
	probe, err := os.MkdirTemp(dir, "overlay-probe-")
	if err != nil {
		return "native"
	}
	defer os.RemoveAll(probe)
	var paths [4]string
	for i, name := range []string{"lower", "upper", "work", "merged"} {
		paths[i] = filepath.Join(probe, name)
		if err := os.Mkdir(paths[i], 0o755); err != nil {
			return "native"
		}
	}
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", paths[0], paths[1], paths[2])
	if err := syscall.Mount("overlay", paths[3], "overlay", 0, data); err != nil {
		return "native"
	}
	_ = syscall.Unmount(paths[3], 0)
	return "overlayfs"
}

// CRI is the CRI client connected to this containerd's socket. Close closes it.
func (c *Containerd) CRI() *CRIClient { return c.cri }

// Socket is the path of containerd's gRPC socket.
func (c *Containerd) Socket() string { return c.socket }

// Snapshotter is the snapshotter the CRI plugin unpacks images with.
func (c *Containerd) Snapshotter() string { return c.snapshotter }

// PID is the containerd process's id.
func (c *Containerd) PID() int { return c.proc.PID() }

// HasContent reports whether containerd's content store holds the blob d.
func (c *Containerd) HasContent(d v1.Hash) bool {
	_, err := os.Stat(filepath.Join(c.root, "io.containerd.content.v1.content", "blobs", d.Algorithm, d.Hex))
	return err == nil
}

// Close closes the CRI client, stops containerd and detaches any mount it left under its
// directory so that the directory can be removed.
func (c *Containerd) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*stopGrace)
	defer cancel()
	errs := []error{c.cri.Close(), c.proc.stop(ctx)}
	mounts, err := mountsUnder(c.dir)
	errs = append(errs, err)
	for _, m := range mounts {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists mount points below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("list mounts: %w", err)
	}
	defer f.Close()
	prefix := filepath.Clean(dir) + "/"
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], prefix) {
			mounts = append(mounts, fields[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mounts)))
	return mounts, sc.Err()
}
