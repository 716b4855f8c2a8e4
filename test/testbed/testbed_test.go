package testbed

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// TestMain runs the tests in a network namespace of their own (skipped unless root; a failure
// when SHOAL_E2E=1), with the agent and the fetch client built first.
func TestMain(m *testing.M) {
	os.Exit(harness.IsolateNetwork(m, harness.BuildShoalFirst(), BuildFetchFirst()))
}

// TestTestbed builds three nodes on 10 Mbit/s links and checks the network the swarm tests rely
// on: reachability, no way out, shaping, an agent mirroring the registry, and a clean teardown.
func TestTestbed(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	stale := staleNamespace(t)

	tb, err := New(ctx, 3, WithNodeRate(10*Mbit))
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = tb.Close()
		}
	})
	if _, err := os.Stat(filepath.Join(netnsDir, stale)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale namespace %s of a dead run was not removed (stat: %v)", stale, err)
	}

	t.Run("no route out", func(t *testing.T) {
		if out := routes(t, exec.CommandContext(ctx, "ip", "-4", "route", "show", "default")); out != "" {
			t.Errorf("the isolated namespace has a default route: %s", out)
		}
		for _, n := range tb.Nodes() {
			if out := routes(t, n.Command(ctx, "ip", "-4", "route", "show", "default")); out != "" {
				t.Errorf("node %s has a default route: %s", n.Name(), out)
			}
		}
	})

	t.Run("nodes reach each other and the registry", func(t *testing.T) {
		for _, n := range tb.Nodes() {
			l, err := n.Listen("tcp", net.JoinHostPort(n.IP().String(), "7000"))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go acceptAndClose(l)
		}
		for _, from := range tb.Nodes() {
			targets := []string{tb.RegistryHost()}
			for _, to := range tb.Nodes() {
				if to != from {
					targets = append(targets, net.JoinHostPort(to.IP().String(), "7000"))
				}
			}
			for _, addr := range targets {
				dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
				conn, err := from.DialContext(dctx, "tcp", addr)
				dcancel()
				if err != nil {
					t.Errorf("node %s cannot reach %s: %v", from.Name(), addr, err)
					continue
				}
				conn.Close()
			}
		}
	})

	t.Run("links are shaped", func(t *testing.T) {
		// Node 1 serves 8 MiB; node 0 fetches it across two 10 Mbit/s links. Physics says at
		// least 6.7 s; 3 s leaves room for bursts and still fails when shaping is off.
		const size = 8 << 20
		data := bytes.Repeat([]byte("shoal testbed shaping check\n"), size/28+1)[:size]
		sum := sha256.Sum256(data)
		d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
		l, err := tb.Node(1).Listen("tcp", net.JoinHostPort(tb.Node(1).IP().String(), "8000"))
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write(data)
		})}
		go func() { _ = srv.Serve(l) }()
		defer srv.Close()

		before, err := tb.Node(0).Traffic()
		if err != nil {
			t.Fatal(err)
		}
		url := "http://" + net.JoinHostPort(tb.Node(1).IP().String(), "8000") + "/blob"
		res, err := tb.Node(0).Fetch(ctx, FetchSpec{URL: url, Digest: d, Timeout: 2 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if !res.OK || res.Bytes != size {
			t.Fatalf("fetch across the testbed: %+v", res)
		}
		if res.Seconds < 3 {
			t.Errorf("8 MiB crossed a 10 Mbit/s link in %.2fs, under the physical 6.7s: links are not shaped", res.Seconds)
		}
		after, err := tb.Node(0).Traffic()
		if err != nil {
			t.Fatal(err)
		}
		if got := after.Sub(before).Received; got < size {
			t.Errorf("node 0's link counted %d bytes received, want at least %d", got, size)
		}
		t.Logf("8 MiB over 10 Mbit/s: %.2fs (%.1f Mbit/s)", res.Seconds, size*8/res.Seconds/1e6)
	})

	t.Run("agent mirrors the registry inside its node", func(t *testing.T) {
		d, err := tb.PushBlob(ctx, "test/blob", 256<<10, 1)
		if err != nil {
			t.Fatal(err)
		}
		n := tb.Node(2)
		if _, err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
		res, err := n.Fetch(ctx, FetchSpec{URL: n.MirrorBlobURL("test/blob", d.String()), Digest: d, Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if !res.OK || res.Bytes != 256<<10 {
			t.Fatalf("fetch through the agent: %+v", res)
		}
		if err := tb.Registry().Sync(ctx); err != nil {
			t.Fatal(err)
		}
		gets, err := tb.Registry().BlobGETs()
		if err != nil {
			t.Fatal(err)
		}
		if gets[d] != 1 {
			t.Errorf("registry served the blob %d times, want once (through the agent)", gets[d])
		}
		u, err := n.AgentUsage()
		if err != nil {
			t.Fatal(err)
		}
		if u.PeakRSS <= 0 {
			t.Errorf("agent peak RSS %d, want > 0", u.PeakRSS)
		}
		tr, err := tb.RegistryTraffic()
		if err != nil {
			t.Fatal(err)
		}
		if tr.Sent < 256<<10 {
			t.Errorf("registry link counted %d bytes sent, want at least the blob", tr.Sent)
		}
	})

	registryPID := tb.Registry().PID()
	prefix := tb.names.ns
	closed = true
	if err := tb.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(netnsDir, prefix+"*"))
	if len(left) > 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
	if ok, err := linkExists(tb.names.bridge()); err != nil || ok {
		t.Errorf("bridge %s left after Close (err %v)", tb.names.bridge(), err)
	}
	if _, err := os.Stat(tb.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("directory %s left after Close (stat: %v)", tb.Dir(), err)
	}
	if processAlive(strconv.Itoa(registryPID)) {
		t.Errorf("registry pid %d still running after Close", registryPID)
	}
}

// TestContainerdPullsThroughAgent pulls an image through CRI on two nodes whose containerd
// runs inside the node and is pointed at the node's own agent by the hosts.toml it writes.
func TestContainerdPullsThroughAgent(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tb, err := New(ctx, 2, WithContainerd())
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/app:v1", harness.ImageSpec{Layers: 2, LayerSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range tb.Nodes() {
		if _, err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := n.PullImage(ctx, img.Name(RegistryName)); err != nil {
			t.Fatal(err)
		}
		for _, l := range img.Layers {
			if !n.Containerd().HasContent(l) {
				t.Errorf("node %s: containerd lacks layer %s after the pull", n.Name(), l)
			}
		}
	}
	if err := tb.Registry().Sync(ctx); err != nil {
		t.Fatal(err)
	}
	// Without a swarm each agent fetches each layer once, and containerd itself never asks the
	// registry (its requests would carry its own user agent).
	gets, err := tb.Registry().BlobGETs()
	if err != nil {
		t.Fatal(err)
	}
	direct, err := tb.Registry().BlobGETsWhere(func(r harness.Request) bool { return strings.Contains(r.UserAgent, "containerd") })
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range img.Layers {
		if gets[l] != len(tb.Nodes()) || direct[l] != 0 {
			t.Errorf("layer %s: registry served it %d times (%d to containerd), want %d, all to agents", l, gets[l], direct[l], len(tb.Nodes()))
		}
	}
}

func TestNewRefusesSecondTestbed(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tb, err := New(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	if second, err := New(ctx, 1); err == nil {
		second.Close()
		t.Fatal("a second testbed in the same namespace was built")
	}
}

// staleNamespace creates a namespace named like one of a testbed run whose process is gone.
func staleNamespace(t *testing.T) string {
	t.Helper()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	name := namePrefix + strconv.Itoa(dead.Process.Pid) + "-dead-n0"
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	return name
}

func routes(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(cmd.Args, " "), err)
	}
	return strings.TrimSpace(string(out))
}

func acceptAndClose(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}
