package e2e

import (
	"context"
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/shoal-dev/shoal/test/cluster"
	"github.com/shoal-dev/shoal/test/harness"
)

// TestAgentLivenessOnRealCluster breaks the agent on one node of a real cluster in the two ways
// a liveness probe has to catch (the process stopped, as SIGSTOP leaves it: the kernel still
// accepts connections, nothing answers; and a deadlock inside it, by the fault-injection hook),
// while containerd on that node pulls a new image. With the chart's probe settings the kubelet
// restarts the agent, the pull succeeds, and the time both took is logged (the bound
// docs/operations.md reports; never asserted).
func TestAgentLivenessOnRealCluster(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := newCluster(t, ctx, 2, []string{"agent.extraArgs={--fault-injection}"}, cluster.WithHelmTimeout(time.Minute))
	node := c.Nodes()[0]

	faults := []struct {
		name   string
		inject func(pod corev1.Pod) error
	}{
		{"stopped", func(pod corev1.Pod) error {
			pids, err := node.ContainerPIDs(pod.Status.ContainerStatuses[0].ContainerID)
			if err != nil {
				return err
			}
			for _, pid := range pids {
				if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
					return err
				}
			}
			return nil
		}},
		{"deadlocked", func(corev1.Pod) error {
			client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: node.Testbed().DialContext}}
			url := fmt.Sprintf("http://%s:%d/debug/faults/wedge?on=true", node.IP(), cluster.AgentMetricsPort)
			resp, err := client.Post(url, "", nil)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode/100 != 2 {
				return fmt.Errorf("POST %s: %s", url, resp.Status)
			}
			return nil
		}},
	}
	for i, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			img, err := c.PushWorkloadImage(ctx, fmt.Sprintf("test/liveness:v%d", i), 2, 4<<20)
			if err != nil {
				t.Fatal(err)
			}
			pod := agentPods(t, ctx, c)[node.Name()]
			restarts := pod.Status.ContainerStatuses[0].RestartCount
			start := time.Now()
			if err := f.inject(pod); err != nil {
				t.Fatal(err)
			}
			pulled := make(chan error, 1)
			var pullTook time.Duration
			go func() {
				_, err := node.Containerd().CRI().PullImage(ctx, img.Name(cluster.RegistryName))
				pullTook = time.Since(start)
				pulled <- err
			}()
			var recovered time.Duration
			for recovered == 0 {
				select {
				case <-ctx.Done():
					t.Fatalf("the %s agent was not restarted: %v", f.name, ctx.Err())
				case <-time.After(200 * time.Millisecond):
				}
				p, ok := agentPods(t, ctx, c)[node.Name()]
				if ok && p.Status.ContainerStatuses[0].RestartCount > restarts && p.Status.ContainerStatuses[0].Ready {
					recovered = time.Since(start)
				}
			}
			if err := <-pulled; err != nil {
				t.Fatalf("pull while the agent was %s: %v", f.name, err)
			}
			t.Logf("agent %s: restarted and ready again after %.1fs; a pull started with the fault took %.1fs", f.name, recovered.Seconds(), pullTook.Seconds())
		})
	}
}
