package main

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// liveMembers reads shoal_swarm_members{state="live"} from an agent's /metrics ("" if absent).
func liveMembers(metricsAddr string) string {
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), `shoal_swarm_members{state="live"} `); ok {
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
		var m v1.SwarmMember
		if err := env.Client.Get(t.Context(), client.ObjectKey{Name: a.node}, &m); err != nil {
			t.Fatalf("SwarmMember %s: %v", a.node, err)
		}
		if got := m.Spec.IP + ":" + itoa(m.Spec.Port); got != a.p2p {
			t.Errorf("SwarmMember %s announces %s, want %s", a.node, got, a.p2p)
		}
	}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }
