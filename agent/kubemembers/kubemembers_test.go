package kubemembers_test

import (
	"context"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/agent/kubemembers"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// waitFor is how long a test waits for the API server and the watches; generous, since it only
// bounds a failure.
const waitFor = 30 * time.Second

// recorder keeps every member list a Source set.
type recorder struct {
	mu   sync.Mutex
	sets [][]netip.AddrPort
	ch   chan struct{}
}

func newRecorder() *recorder { return &recorder{ch: make(chan struct{}, 1)} }

func (r *recorder) set(peers []netip.AddrPort) {
	r.mu.Lock()
	r.sets = append(r.sets, peers)
	r.mu.Unlock()
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

func (r *recorder) last() []netip.AddrPort {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.sets) == 0 {
		return nil
	}
	return r.sets[len(r.sets)-1]
}

// waitLast waits until the last list set is want.
func (r *recorder) waitLast(t *testing.T, want ...netip.AddrPort) {
	t.Helper()
	deadline := time.After(waitFor)
	for !slices.Equal(r.last(), want) {
		select {
		case <-r.ch:
		case <-deadline:
			t.Fatalf("members %v, want %v", r.last(), want)
		}
	}
}

// running is a Source running in the background until the test ends or stop is called.
type running struct {
	rec       *recorder
	announced chan error
	stop      func()
}

func start(t *testing.T, cfg *rest.Config, c kubemembers.Config) *running {
	t.Helper()
	c.Logger = slog.New(slog.DiscardHandler)
	src, err := kubemembers.New(cfg, c)
	if err != nil {
		t.Fatal(err)
	}
	src.SetRetry(10*time.Millisecond, 100*time.Millisecond)
	r := &running{rec: newRecorder(), announced: make(chan error, 100)}
	src.OnAnnounced(func(err error) {
		select {
		case r.announced <- err:
		default:
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r.rec.set) }()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(waitFor):
				t.Errorf("Run did not return %v after its context ended", waitFor)
			}
		})
	}
	t.Cleanup(r.stop)
	return r
}

// waitAnnounced waits for an announcement attempt that succeeded.
func (r *running) waitAnnounced(t *testing.T) {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case err := <-r.announced:
			if err == nil {
				return
			}
		case <-deadline:
			t.Fatal("no successful announcement")
		}
	}
}

func createNode(t *testing.T, env *kubetest.Env, name string) *corev1.Node {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := env.Client.Create(t.Context(), n); err != nil {
		t.Fatal(err)
	}
	return n
}

func member(t *testing.T, env *kubetest.Env, name string) *v1alpha1.SwarmMember {
	t.Helper()
	var m v1alpha1.SwarmMember
	if err := env.Client.Get(t.Context(), client.ObjectKey{Name: name}, &m); err != nil {
		t.Fatal(err)
	}
	return &m
}

func TestAgentsFindEachOther(t *testing.T) {
	env := kubetest.Start(t)
	nodeA, nodeB := createNode(t, env, "node-a"), createNode(t, env, "node-b")
	a := netip.MustParseAddrPort("10.0.0.1:7070")
	b := netip.MustParseAddrPort("[fd00::2]:7070")
	state := filepath.Join(t.TempDir(), "members.json")

	ra := start(t, env.Config, kubemembers.Config{NodeName: "node-a", Self: a, ProtocolVersion: 2, AgentVersion: "v1", StateFile: state})
	rb := start(t, env.Config, kubemembers.Config{NodeName: "node-b", Self: b, ProtocolVersion: 2, AgentVersion: "v1"})
	ra.rec.waitLast(t, a, b)
	rb.rec.waitLast(t, a, b)
	// Sources started in a subtest outlive it: they run until this test ends.
	parent := t

	t.Run("each announces itself, owned by its Node", func(t *testing.T) {
		for _, tc := range []struct {
			node *corev1.Node
			ip   string
		}{{nodeA, "10.0.0.1"}, {nodeB, "fd00::2"}} {
			m := member(t, env, tc.node.Name)
			want := v1alpha1.SwarmMemberSpec{IP: tc.ip, Port: 7070, ProtocolVersion: 2, AgentVersion: "v1"}
			if m.Spec != want {
				t.Errorf("%s: spec %+v, want %+v", tc.node.Name, m.Spec, want)
			}
			if len(m.OwnerReferences) != 1 || m.OwnerReferences[0].Kind != "Node" || m.OwnerReferences[0].UID != tc.node.UID {
				t.Errorf("%s: owners %+v, want the Node (uid %s)", tc.node.Name, m.OwnerReferences, tc.node.UID)
			}
		}
	})

	t.Run("a restart at the same address writes nothing", func(t *testing.T) {
		before := member(t, env, "node-a").ResourceVersion
		ra.stop()
		ra2 := start(parent, env.Config, kubemembers.Config{NodeName: "node-a", Self: a, ProtocolVersion: 2, AgentVersion: "v1", StateFile: state})
		ra2.waitAnnounced(t)
		ra2.rec.waitLast(t, a, b)
		if after := member(t, env, "node-a").ResourceVersion; after != before {
			t.Errorf("SwarmMember written on a restart with nothing changed: resourceVersion %s -> %s", before, after)
		}
		ra = ra2
	})

	a2 := netip.MustParseAddrPort("10.0.0.1:7071")
	t.Run("a new address reaches the others", func(t *testing.T) {
		ra.stop()
		ra = start(parent, env.Config, kubemembers.Config{NodeName: "node-a", Self: a2, ProtocolVersion: 2, AgentVersion: "v2", StateFile: state})
		rb.rec.waitLast(t, a2, b)
		if m := member(t, env, "node-a"); m.Spec.Port != 7071 || m.Spec.AgentVersion != "v2" {
			t.Errorf("spec %+v, want port 7071, agent v2", m.Spec)
		}
	})

	t.Run("a member removed leaves the others' lists", func(t *testing.T) {
		if err := env.Client.Delete(t.Context(), member(t, env, "node-b")); err != nil {
			t.Fatal(err)
		}
		ra.rec.waitLast(t, a2)
	})

	t.Run("the last list is saved for a start without the API server", func(t *testing.T) {
		ra.stop()
		// Nothing listens on port 1 of loopback: the API server is unreachable.
		dead := &rest.Config{Host: "https://127.0.0.1:1", Timeout: time.Second}
		rc := start(t, dead, kubemembers.Config{NodeName: "node-a", Self: a2, StateFile: state,
			Bootstrap: []netip.AddrPort{netip.MustParseAddrPort("10.9.9.9:7070")}})
		rc.rec.waitLast(t, a2)
		rc.stop()
	})
}

func TestBootstrapWithoutAPIServer(t *testing.T) {
	self := netip.MustParseAddrPort("10.0.0.1:7070")
	boot := []netip.AddrPort{self, netip.MustParseAddrPort("10.0.0.2:7070")}
	dead := &rest.Config{Host: "https://127.0.0.1:1", Timeout: time.Second}
	r := start(t, dead, kubemembers.Config{NodeName: "node-a", Self: self,
		StateFile: filepath.Join(t.TempDir(), "none.json"), Bootstrap: boot})
	r.rec.waitLast(t, boot...)
	// Run keeps trying the API server, and still stops at once when asked.
	r.stop()
}

func TestAnnounceWaitsForItsNode(t *testing.T) {
	env := kubetest.Start(t)
	self := netip.MustParseAddrPort("10.0.0.3:7070")
	r := start(t, env.Config, kubemembers.Config{NodeName: "late", Self: self})
	select {
	case err := <-r.announced:
		if err == nil {
			t.Fatal("announced before its Node existed")
		}
	case <-time.After(waitFor):
		t.Fatal("no announcement attempt")
	}
	createNode(t, env, "late")
	r.waitAnnounced(t)
	r.rec.waitLast(t, self)
	if m := member(t, env, "late"); m.Spec.IP != "10.0.0.3" {
		t.Errorf("spec %+v", m.Spec)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  kubemembers.Config
	}{
		{"no node name", kubemembers.Config{Self: netip.MustParseAddrPort("10.0.0.1:7070")}},
		{"no address", kubemembers.Config{NodeName: "a"}},
		{"port 0", kubemembers.Config{NodeName: "a", Self: netip.MustParseAddrPort("10.0.0.1:0")}},
	} {
		if _, err := kubemembers.New(&rest.Config{}, tc.cfg); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
