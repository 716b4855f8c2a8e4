package testbed

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// netnsDir is where `ip netns add` pins named namespaces.
	netnsDir = "/run/netns"
	// namePrefix starts every namespace a testbed creates; the owner's PID follows it, so a
	// later run can tell a dead run's namespaces from a live one's.
	namePrefix = "shoaltb-"
	// nodeLink is the node side of each veth pair, inside the node's namespace.
	nodeLink = "eth0"
	// shapeLatency bounds the tbf queue: rate × latency bytes may wait before drops start.
	shapeLatency = "50ms"
)

var (
	subnet     = netip.MustParsePrefix("10.99.0.0/16")
	registryIP = netip.MustParseAddr("10.99.0.1")
	// switchIP is the isolated namespace's own address on the bridge.
	switchIP = netip.MustParseAddr("10.99.255.254")
	// staleName matches the namespaces of any testbed run: shoaltb-<pid>-<id>-<role>.
	staleName = regexp.MustCompile(`^` + namePrefix + `(\d+)-[0-9a-f]+-`)
)

// nodeIP is node i's address: 10.99.0.10, 10.99.0.11, ...
func nodeIP(i int) netip.Addr {
	b := subnet.Addr().As4()
	x := 10 + i
	b[2], b[3] = byte(x>>8), byte(x)
	return netip.AddrFrom4(b)
}

// names are the kernel objects of one testbed. Link names live in the isolated namespace and
// stay under the 15-byte limit; namespace names are global to the machine (/run/netns).
type names struct {
	id string // random, 4 hex digits
	ns string // namespace prefix: shoaltb-<pid>-<id>
}

func newNames() (names, error) {
	var b [2]byte
	if _, err := rand.Read(b[:]); err != nil {
		return names{}, fmt.Errorf("random testbed id: %w", err)
	}
	id := hex.EncodeToString(b[:])
	return names{id: id, ns: fmt.Sprintf("%s%d-%s", namePrefix, os.Getpid(), id)}, nil
}

func (n names) bridge() string              { return "tb" + n.id + "br" }
func (n names) registryLink() string        { return "tb" + n.id + "r" }
func (n names) registryNetns() string       { return n.ns + "-reg" }
func (n names) nodeSwitchLink(i int) string { return fmt.Sprintf("tb%sn%d", n.id, i) }
func (n names) nodeNetns(i int) string      { return fmt.Sprintf("%s-n%d", n.ns, i) }

// run runs a short command (ip, tc) and returns its error with its output.
func run(ctx context.Context, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// tbfArgs are the tc arguments that shape egress of dev to rate (run with `tc -n NS` for a
// device inside a node). The bucket holds 40 ms of traffic but at least 128 KiB, so that a
// veth's 64 KiB GSO super-packets always fit.
func tbfArgs(dev string, rate Rate) []string {
	burst := max(int64(rate.BytesPerSecond()*0.040), 128<<10)
	return []string{"qdisc", "replace", "dev", dev, "root", "tbf",
		"rate", fmt.Sprintf("%dbit", int64(rate)), "burst", strconv.FormatInt(burst, 10), "latency", shapeLatency}
}

// addNamespace creates netns name with one veth to the bridge: switchLink on the bridge side,
// eth0 with ip/16 inside, lo up, both directions shaped to rate (0 = unshaped). undo is
// appended before each step that needs undoing, so a half-built namespace is removed too.
func addNamespace(ctx context.Context, name, switchLink, bridge string, ip netip.Addr, rate Rate, undo *[]func() error) error {
	if err := run(ctx, "ip", "netns", "add", name); err != nil {
		return err
	}
	*undo = append(*undo, func() error { return deleteNamespace(name) })
	if err := run(ctx, "ip", "link", "add", switchLink, "type", "veth", "peer", "name", nodeLink, "netns", name); err != nil {
		return err
	}
	*undo = append(*undo, func() error { return deleteLink(switchLink) })
	steps := [][]string{
		{"ip", "link", "set", switchLink, "master", bridge, "up"},
		{"ip", "-n", name, "addr", "add", ip.String() + "/" + strconv.Itoa(subnet.Bits()), "dev", nodeLink},
		{"ip", "-n", name, "link", "set", nodeLink, "up"},
		{"ip", "-n", name, "link", "set", "lo", "up"},
	}
	if rate > 0 {
		steps = append(steps,
			append([]string{"tc", "-n", name}, tbfArgs(nodeLink, rate)...), // node egress
			append([]string{"tc"}, tbfArgs(switchLink, rate)...),           // node ingress
		)
	}
	for _, s := range steps {
		if err := run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

func deleteNamespace(name string) error {
	return run(context.Background(), "ip", "netns", "del", name)
}

// deleteLink removes a link; one that is already gone (a veth whose peer's namespace died
// takes it along) is not an error.
func deleteLink(name string) error {
	if ok, err := linkExists(name); err == nil && !ok {
		return nil
	}
	return run(context.Background(), "ip", "link", "del", name)
}

func linkExists(name string) (bool, error) {
	stats, err := readLinkStats()
	if err != nil {
		return false, err
	}
	_, ok := stats[name]
	return ok, nil
}

// Traffic is what crossed a link, seen from the node (or registry) at its end.
type Traffic struct {
	Received int64 // bytes into the node
	Sent     int64 // bytes out of the node
}

// Sub returns the traffic between an earlier reading and t.
func (t Traffic) Sub(earlier Traffic) Traffic {
	return Traffic{Received: t.Received - earlier.Received, Sent: t.Sent - earlier.Sent}
}

// linkTraffic reads the counters of a bridge-side veth, seen from the node.
func linkTraffic(switchLink string) (Traffic, error) {
	stats, err := readLinkStats()
	if err != nil {
		return Traffic{}, err
	}
	s, ok := stats[switchLink]
	if !ok {
		return Traffic{}, fmt.Errorf("link %s not found", switchLink)
	}
	return s.traffic(), nil
}

// traffic turns a bridge-side veth's counters around: what the switch side transmitted, the
// node received.
func (s linkStats) traffic() Traffic { return Traffic{Received: s.tx, Sent: s.rx} }

type linkStats struct{ rx, tx int64 }

// readLinkStats parses /proc/thread-self/net/dev: the counters of the calling thread's
// namespace. (/sys/class/net would show the namespace that mounted /sys, the machine's.)
func readLinkStats() (map[string]linkStats, error) {
	f, err := os.Open("/proc/thread-self/net/dev")
	if err != nil {
		return nil, fmt.Errorf("read link counters: %w", err)
	}
	defer f.Close()
	stats := map[string]linkStats{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue // the two header lines
		}
		fields := strings.Fields(rest)
		if len(fields) < 9 {
			continue
		}
		rx, err1 := strconv.ParseInt(fields[0], 10, 64)
		tx, err2 := strconv.ParseInt(fields[8], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("parse link counters of %s: %q", strings.TrimSpace(name), rest)
		}
		stats[strings.TrimSpace(name)] = linkStats{rx: rx, tx: tx}
	}
	return stats, sc.Err()
}

// inNetns runs fn on an OS thread switched into the network namespace at path, so that the
// sockets fn creates belong to that namespace (a socket keeps its namespace for life, on any
// thread). The thread returns to its namespace afterwards; if it cannot, it stays locked and
// the Go runtime discards it when the goroutine ends.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored := false
		defer func() {
			if restored {
				runtime.UnlockOSThread()
			}
		}()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("open own network namespace: %w", err)
			restored = true
			return
		}
		defer self.Close()
		target, err := os.Open(path)
		if err != nil {
			errc <- fmt.Errorf("open network namespace %s: %w", path, err)
			restored = true
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			restored = true
			return
		}
		fnErr := fn()
		restored = unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil
		errc <- fnErr
	}()
	return <-errc
}

// hasRoute reports whether this namespace already routes the testbed subnet: another testbed
// is running here, and a second bridge with the same addresses would break both.
func hasRoute(ctx context.Context) (bool, error) {
	out, err := exec.CommandContext(ctx, "ip", "-4", "route", "show", subnet.String()).Output()
	if err != nil {
		return false, fmt.Errorf("ip route show %s: %w", subnet, err)
	}
	return strings.TrimSpace(string(out)) != "", nil
}

// removeStale deletes namespaces and temporary directories left by testbed runs whose process
// has exited (killed before Close). Processes still inside such a namespace were started by
// that run and are killed by PID first. Namespaces of live runs are left alone.
func removeStale(ctx context.Context, logger *slog.Logger) {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		return // no named namespaces at all
	}
	for _, e := range entries {
		m := staleName.FindStringSubmatch(e.Name())
		if m == nil || processAlive(m[1]) {
			continue
		}
		if out, err := exec.CommandContext(ctx, "ip", "netns", "pids", e.Name()).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		if err := deleteNamespace(e.Name()); err != nil {
			logger.Warn("remove stale testbed namespace", "netns", e.Name(), "err", err)
		} else {
			logger.Info("removed stale testbed namespace", "netns", e.Name())
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range dirs {
		pid, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), dirPrefix), "-")
		if _, err := strconv.Atoi(pid); err != nil || processAlive(pid) {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			logger.Warn("remove stale testbed directory", "dir", d, "err", err)
		}
	}
}

func processAlive(pid string) bool {
	_, err := os.Stat(filepath.Join("/proc", pid))
	return err == nil
}
