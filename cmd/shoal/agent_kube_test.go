package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// liveMembers reads shoal_swarm_members{state="live"} from an agent's /metrics ("" if absent).
func liveMembers(metricsAddr string) string {
	return metricValue(metricsAddr, `shoal_swarm_members{state="live"}`)
}

// metricValue reads one series (name and labels as /metrics writes them) from an agent's
// /metrics ("" if absent).
func metricValue(metricsAddr, series string) string {
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return v
		}
	}
	return ""
}

// TestAgentsFindEachOtherThroughKubernetes runs two `shoal agent --membership kubernetes`
// against a real API server: each announces itself and swarms with the other.
func TestAgentsFindEachOtherThroughKubernetes(t *testing.T) {
	env := kubetest.Start(t)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	type agentProc struct {
		node, p2p, metrics string
		stderr             *bytes.Buffer
		done               chan error
		cancel             func()
	}
	var agents []*agentProc
	for i, node := range []string{"node-1", "node-2"} {
		if err := env.Client.Create(t.Context(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}); err != nil {
			t.Fatal(err)
		}
		// Distinct loopback IPs: members are told apart by IP.
		ip := []string{"127.0.0.2", "127.0.0.3"}[i]
		a := &agentProc{node: node, p2p: strings.Replace(freeAddr(t), "127.0.0.1", ip, 1), metrics: freeAddr(t),
			stderr: &bytes.Buffer{}, done: make(chan error, 1)}
		root := newRootCommand()
		root.SetOut(&bytes.Buffer{})
		root.SetErr(a.stderr)
		root.SetArgs([]string{"agent", "--data-dir", t.TempDir(), "--containerd-hosts-dir", "", "--containerd-config", "",
			"--mirror-addr", "127.0.0.1:0", "--metrics-addr", a.metrics, "--mirror-registries", "registry.test",
			"--default-registry", "registry.test", "--p2p-addr", a.p2p,
			"--membership", "kubernetes", "--node-name", node, "--kubeconfig", kubeconfig})
		ctx, cancel := context.WithCancel(context.Background())
		a.cancel = cancel
		go func() { a.done <- root.ExecuteContext(ctx) }()
		agents = append(agents, a)
	}
	t.Cleanup(func() {
		for _, a := range agents {
			a.cancel()
			select {
			case err := <-a.done:
				if err != nil {
					t.Errorf("agent %s: %v", a.node, err)
				}
			case <-time.After(time.Minute):
				t.Errorf("agent %s did not stop", a.node)
			}
			if t.Failed() {
				t.Logf("agent %s log:\n%s", a.node, a.stderr)
			}
		}
	})

	for _, a := range agents {
		for deadline := time.Now().Add(30 * time.Second); liveMembers(a.metrics) != "2"; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("agent %s: live members %q, want 2", a.node, liveMembers(a.metrics))
			}
		}
		// An agent counts itself live from the start, so it may see two live members before
		// its own SwarmMember is written: wait for that too.
		var m v1.SwarmMember
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			err := env.Client.Get(t.Context(), client.ObjectKey{Name: a.node}, &m)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("SwarmMember %s: %v", a.node, err)
			}
		}
		if got := m.Spec.IP + ":" + itoa(m.Spec.Port); got != a.p2p {
			t.Errorf("SwarmMember %s announces %s, want %s", a.node, got, a.p2p)
		}
	}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// TestAgentHoldsItsNodeCache runs `shoal agent --membership kubernetes` against a real API
// server and a registry on loopback: the agent fetches its NodeCache's item through its swarm,
// pins it and reports it held.
func TestAgentHoldsItsNodeCache(t *testing.T) {
	env := kubetest.Start(t)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	regSrv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer regSrv.Close()
	regHost := strings.TrimPrefix(regSrv.URL, "http://")
	img, err := random.Image(256<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.ParseReference(regHost + "/team/app:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(tag, img); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	ref := "registry.test/team/app:1@" + digest.String()
	if err := env.Client.Create(t.Context(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(t.Context(), &v1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: "node-1"},
		Spec: v1.NodeCacheSpec{Items: []v1.NodeCacheItem{{Reference: ref, Pin: true}}}}); err != nil {
		t.Fatal(err)
	}

	metrics := freeAddr(t)
	var stderr bytes.Buffer
	root := newRootCommand()
	root.SetOut(&bytes.Buffer{})
	root.SetErr(&stderr)
	root.SetArgs([]string{"agent", "--data-dir", t.TempDir(), "--containerd-hosts-dir", "", "--containerd-config", "",
		"--mirror-addr", "127.0.0.1:0", "--metrics-addr", metrics, "--mirror-registries", "registry.test",
		"--default-registry", "registry.test", "--registry-endpoint", "registry.test=" + regSrv.URL,
		"--p2p-addr", strings.Replace(freeAddr(t), "127.0.0.1", "127.0.0.2", 1),
		"--membership", "kubernetes", "--node-name", "node-1", "--kubeconfig", kubeconfig,
		"--node-cache-status-interval", "100ms"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(time.Minute):
			t.Error("agent did not stop")
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", stderr.String())
		}
	}()

	var nc v1.NodeCache
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if err := env.Client.Get(t.Context(), client.ObjectKey{Name: "node-1"}, &nc); err != nil {
			t.Fatal(err)
		}
		if nc.Status.Ready == "1/1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("NodeCache not held within a minute; status %+v", nc.Status)
		}
	}
	item := nc.Status.Items[0]
	if item.State != v1.ItemReady || item.Bytes != item.TotalBytes || nc.Status.Store == nil ||
		nc.Status.Store.PinnedBytes != item.TotalBytes || nc.Status.AgentVersion != version {
		t.Errorf("status %+v, item %+v: want the item held, all of it pinned, agent %s", nc.Status, item, version)
	}
	for series, want := range map[string]string{
		`shoal_nodecache_items{state="Ready"}`: "1",
		"shoal_store_pinned_bytes":             strconv.FormatInt(item.TotalBytes, 10),
	} {
		if got := metricValue(metrics, series); got != want {
			t.Errorf("%s = %q, want %s", series, got, want)
		}
	}
	// The layers came through the swarm, whose seeder (this node) read them from the registry.
	if got := metricValue(metrics, `shoal_swarm_fetched_bytes_total{source="upstream"}`); got == "" || got == "0" {
		t.Errorf(`shoal_swarm_fetched_bytes_total{source="upstream"} = %q: the blobs did not come through the swarm`, got)
	}
}
