package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/kubetest"
	"github.com/shoal-dev/shoal/test/testbed"
)

// TestSwarmMembersFromKubernetes starts four agents on the testbed with --membership
// kubernetes and no --peers, against a real API server on the testbed's bridge: they find each
// other through their SwarmMembers and share a new blob with about one upstream copy. Then the
// API server goes away and an agent restarts: it swarms again with the members it saved, and
// the blob still reaches a node that lacked it without a second upstream copy.
// kubeTestbed builds n testbed nodes, a real API server on the testbed's bridge with a Node
// object for each (labels(i) as its labels; labels may be nil), and on each node an agent with
// --membership kubernetes and args, and waits until they swarm. It returns the testbed, the API
// server and the kubeconfig file that agents (and a controller) use. When the test ends, the
// agents stop before the API server, which then has no watches to drain (a minute otherwise),
// and a failed test logs their output.
func kubeTestbed(t *testing.T, ctx context.Context, n int, labels func(i int) map[string]string, args []string, opts ...testbed.Option) (*testbed.Testbed, *kubetest.Env, string) {
	t.Helper()
	tb, err := testbed.New(ctx, n, append([]testbed.Option{testbed.WithShoalBinary(shoalBinary(t))}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tb.Close() })
	env := kubetest.StartWith(t, kubetest.Options{ListenAddress: tb.SwitchAddr().String()})
	t.Cleanup(func() {
		for _, node := range tb.Nodes() {
			if a := node.Agent(); a != nil && t.Failed() {
				if b, err := os.ReadFile(a.LogPath()); err == nil {
					t.Logf("agent of %s:\n%s", node.Name(), b)
				}
			}
			_ = node.StopAgent(context.Background())
		}
	})
	kubeconfig := filepath.Join(tb.Dir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	for i, node := range tb.Nodes() {
		obj := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node.Name()}}
		if labels != nil {
			obj.Labels = labels(i)
		}
		if err := env.Client.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
		nodeArgs := append([]string{"--p2p-addr", node.P2PAddr(), "--membership", "kubernetes",
			"--node-name", node.Name(), "--kubeconfig", kubeconfig}, args...)
		if _, err := node.StartAgent(ctx, nodeArgs...); err != nil {
			t.Fatal(err)
		}
	}
	if err := tb.WaitForSwarm(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	return tb, env, kubeconfig
}

func TestSwarmMembersFromKubernetes(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb, env, _ := kubeTestbed(t, ctx, 4, nil, nil)
	for _, node := range tb.Nodes() {
		var m shoalv1.SwarmMember
		if err := env.Client.Get(ctx, client.ObjectKey{Name: node.Name()}, &m); err != nil {
			t.Fatalf("SwarmMember %s: %v", node.Name(), err)
		}
		if m.Spec.IP != node.IP().String() {
			t.Errorf("SwarmMember %s announces %s, want %s", node.Name(), m.Spec.IP, node.IP())
		}
	}

	const size = 32 << 20
	d, err := tb.PushBlob(ctx, "test/blob", size, 51)
	if err != nil {
		t.Fatal(err)
	}
	fetchOn(t, ctx, tb, d, 0, 1, 2)
	if sent := upstreamBytes(t, ctx, tb)[d]; float64(sent) > 1.1*size {
		t.Errorf("the registry sent %d bytes of a %d-byte blob to 3 nodes: the agents did not swarm", sent, size)
	}

	// Without the API server, a restarted agent starts from the members it saved.
	stopAt := time.Now()
	if err := env.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("API server stopped in %v", time.Since(stopAt).Round(time.Second))
	agent0 := tb.Node(0).Agent()
	if err := agent0.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := agent0.Restart(ctx); err != nil { // same data directory: the saved member list
		t.Fatal(err)
	}
	if err := tb.WaitForSwarm(ctx, time.Minute); err != nil {
		t.Fatalf("after a restart without the API server: %v", err)
	}
	fetchOn(t, ctx, tb, d, 3)
	if sent := upstreamBytes(t, ctx, tb)[d]; float64(sent) > 1.1*size {
		t.Errorf("the registry sent %d bytes of a %d-byte blob once node 3 fetched it from its peers", sent, size)
	}
}
