package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"go.uber.org/goleak"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/internal/leakcheck"
)

// TestMain fails the package's tests if any goroutine is still running once they have ended.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// startAgent runs the agent with every part on (mirror, metrics, swarm, fault hooks) until the
// returned stop is called; stop returns Run's error.
func startAgent(t *testing.T, cfg Config) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	waitFor(t, "http://"+cfg.MetricsAddr+"/readyz", http.StatusOK)
	stopped := false
	stop = func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(time.Minute):
			t.Fatal("Run did not return within a minute of its context's end")
			return nil
		}
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

func fullConfig(t *testing.T) Config {
	cfg := validConfig(t)
	ports := freePorts(t, 3)
	cfg.MirrorAddr, cfg.MetricsAddr = ports[0], ports[1]
	cfg.FaultInjection = true
	cfg.Swarm.P2PAddr = netip.MustParseAddrPort(ports[2])
	cfg.Swarm.Peers = []netip.AddrPort{cfg.Swarm.P2PAddr, netip.MustParseAddrPort("127.0.0.2:1")}
	return cfg
}

// TestRunReleasesEverything: when Run returns, every goroutine it started has ended, every
// address it listened on is free again, and the content store is closed (its lock is free).
func TestRunReleasesEverything(t *testing.T) {
	cfg := fullConfig(t)
	stop := startAgent(t, cfg)
	waitFor(t, "http://"+cfg.MirrorAddr+"/v2/", http.StatusOK)
	if err := stop(); err != nil {
		t.Fatalf("Run returned %v after cancel", err)
	}
	if left := leakcheck.Running("shoal/agent/", "net/http.(*Server).Serve"); len(left) > 0 {
		t.Errorf("%d goroutines of the agent still running after Run returned; the first:\n%s", len(left), left[0])
	}
	for _, addr := range []string{cfg.MirrorAddr, cfg.MetricsAddr, cfg.Swarm.P2PAddr.String()} {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Errorf("%s still taken after Run returned: %v", addr, err)
			continue
		}
		_ = l.Close()
	}
	s, err := store.Open(cfg.DataDir)
	if err != nil {
		t.Fatalf("the content store is still held after Run returned: %v", err)
	}
	_ = s.Close()
}

// TestHealthzSeesAWedgedStore: /healthz fails while the content store does not answer (wedged
// by the fault hook, as a deadlock would), and succeeds again once it does.
func TestHealthzSeesAWedgedStore(t *testing.T) {
	cfg := fullConfig(t)
	startAgent(t, cfg)
	healthz := "http://" + cfg.MetricsAddr + "/healthz"
	waitFor(t, healthz, http.StatusOK)
	wedge(t, cfg.MetricsAddr, true)
	waitFor(t, healthz, http.StatusServiceUnavailable)
	wedge(t, cfg.MetricsAddr, false)
	waitFor(t, healthz, http.StatusOK)
}

func wedge(t *testing.T, metricsAddr string, on bool) {
	t.Helper()
	url := "http://" + metricsAddr + "/debug/faults/wedge?on=false"
	if on {
		url = "http://" + metricsAddr + "/debug/faults/wedge?on=true"
	}
	resp, err := http.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("POST %s: %s", url, resp.Status)
	}
}

// TestNodeCacheHookStopsBeforeTheStore: the NodeCache hook gets the agent's parts, runs until
// the agent stops, and can still use the store once told to stop (the store closes after it);
// its error stops the agent.
func TestNodeCacheHookStopsBeforeTheStore(t *testing.T) {
	cfg := fullConfig(t)
	afterStop := make(chan error, 1)
	cfg.NodeCache = func(ctx context.Context, c Content) error {
		if c.Store == nil || c.Upstream == nil || c.BlobSource == nil || c.Mirrors == nil || c.Registerer == nil {
			return errors.New("a part is missing")
		}
		if !c.Mirrors("registry.test") || c.Mirrors("elsewhere.test") {
			return errors.New("Mirrors does not follow MirrorRegistries")
		}
		<-ctx.Done()
		data := []byte("written while stopping")
		d, _, _ := v1.SHA256(bytes.NewReader(data))
		b, err := c.Store.Fetch(context.Background(), d, func(context.Context) (io.ReadCloser, int64, error) {
			return io.NopCloser(bytes.NewReader(data)), int64(len(data)), nil
		})
		if err == nil {
			_, err = io.Copy(io.Discard, b)
			_ = b.Close()
		}
		afterStop <- err
		return nil
	}
	stop := startAgent(t, cfg)
	if err := stop(); err != nil {
		t.Fatalf("Run returned %v after cancel", err)
	}
	if err := <-afterStop; err != nil {
		t.Errorf("the store refused the hook while it stopped: %v", err)
	}

	cfg = fullConfig(t)
	cfg.NodeCache = func(context.Context, Content) error { return errors.New("no API server config") }
	if err := Run(t.Context(), cfg); err == nil || !strings.Contains(err.Error(), "node cache: no API server config") {
		t.Errorf("Run with a failing NodeCache hook = %v, want its error", err)
	}
}
