// Package manifests_test checks the manifests in config/ against a real API server: what the
// agent's role and the admission policy let an agent do.
package manifests_test

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

const nodeNameExtra = "authentication.kubernetes.io/node-name"

func configDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "config")
}

// readObjects returns the objects of a YAML file (several documents).
func readObjects(t *testing.T, path string) []*unstructured.Unstructured {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, err := kubetest.DecodeObjects(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return objs
}

// apply creates every object of a YAML file (several documents) as it is.
func apply(t *testing.T, c client.Client, path string) {
	t.Helper()
	for _, u := range readObjects(t, path) {
		if err := c.Create(t.Context(), u); err != nil {
			t.Fatalf("%s: create %s %s: %v", path, u.GetKind(), u.GetName(), err)
		}
	}
}

// agentClient acts as the agent of node: its service account, with the node name the API server
// puts in tokens bound to a pod on that node ("" for a token without one).
func agentClient(t *testing.T, env *kubetest.Env, node string) client.Client {
	t.Helper()
	cfg := rest.CopyConfig(env.Config)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:shoal-system:shoal-agent",
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:shoal-system", "system:authenticated"},
	}
	if node != "" {
		cfg.Impersonate.Extra = map[string][]string{nodeNameExtra: {node}}
	}
	c, err := client.New(cfg, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestAgentWritesOnlyItsOwnNode applies the agent's ClusterRole and the admission policy, and
// checks, as the agents of two nodes, what each may and may not do.
func TestAgentWritesOnlyItsOwnNode(t *testing.T) {
	env := kubetest.Start(t)
	admin := env.Client
	ctx := t.Context()
	if err := admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shoal-system"}}); err != nil {
		t.Fatal(err)
	}
	apply(t, admin, filepath.Join(configDir(), "rbac", "agent", "role.yaml"))
	apply(t, admin, filepath.Join(configDir(), "policy", "agent-own-node.yaml"))
	agentSubject := []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "shoal-system", Name: "shoal-agent"}}
	for _, obj := range []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}},
		&rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "shoal-agent"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "shoal-agent"},
			Subjects:   agentSubject,
		},
		&rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "shoal-agent", Namespace: "shoal-system"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "shoal-agent"},
			Subjects:   agentSubject,
		},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "shoal-pull-0123", Namespace: "shoal-system"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}},
		&shoalv1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		&shoalv1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "pull", Namespace: "team"}},
	} {
		if err := admin.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
	}
	agentA := agentClient(t, env, "node-a")
	member := func(name string) *shoalv1.SwarmMember {
		return &shoalv1.SwarmMember{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: shoalv1.SwarmMemberSpec{IP: "10.0.0.1", Port: 7070}}
	}

	// The policy takes effect a moment after it is created: wait until it denies.
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := agentA.Create(ctx, member("node-b"))
		if apierrors.IsForbidden(err) || apierrors.IsInvalid(err) {
			if !strings.Contains(err.Error(), "a Shoal agent writes only its own node's objects") {
				t.Errorf("denied, but not by the policy's message: %v", err)
			}
			break
		}
		if err == nil {
			if err := admin.Delete(ctx, member("node-b")); err != nil {
				t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent of node-a may still create node-b's SwarmMember 30 s after the policy was created (last: %v)", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	t.Run("its own SwarmMember", func(t *testing.T) {
		m := member("node-a")
		if err := agentA.Create(ctx, m); err != nil {
			t.Fatalf("create: %v", err)
		}
		m.Spec.Port = 7071
		if err := agentA.Update(ctx, m); err != nil {
			t.Errorf("update: %v", err)
		}
	})

	t.Run("its own NodeCache's status, not another's, not the spec", func(t *testing.T) {
		var own, other shoalv1.NodeCache
		if err := agentA.Get(ctx, client.ObjectKey{Name: "node-a"}, &own); err != nil {
			t.Fatal(err)
		}
		own.Status.AgentVersion = "v1"
		if err := agentA.Status().Update(ctx, &own); err != nil {
			t.Errorf("own status: %v", err)
		}
		if err := agentA.Get(ctx, client.ObjectKey{Name: "node-b"}, &other); err != nil {
			t.Fatal(err)
		}
		other.Status.AgentVersion = "v1"
		if err := agentA.Status().Update(ctx, &other); !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("node-b's status as node-a's agent: %v, want denied", err)
		}
		own.Spec.Items = []shoalv1.NodeCacheItem{{Reference: "registry.test/x@sha256:" + strings.Repeat("a", 64)}}
		if err := agentA.Update(ctx, &own); !apierrors.IsForbidden(err) {
			t.Errorf("own spec: %v, want forbidden (the controller writes specs)", err)
		}
	})

	t.Run("a token without a node writes nothing", func(t *testing.T) {
		err := agentClient(t, env, "").Create(ctx, member("node-c"))
		if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("create without a node name: %v, want denied", err)
		}
	})

	t.Run("a pull token in its namespace, by name only", func(t *testing.T) {
		if err := agentA.Get(ctx, client.ObjectKey{Namespace: "shoal-system", Name: "shoal-pull-0123"}, &corev1.Secret{}); err != nil {
			t.Errorf("get a pull token: %v", err)
		}
		if err := agentA.List(ctx, &corev1.SecretList{}, client.InNamespace("shoal-system")); !apierrors.IsForbidden(err) {
			t.Errorf("list Secrets in its namespace: %v, want forbidden", err)
		}
	})

	t.Run("no Secrets outside its namespace, no Prewarms", func(t *testing.T) {
		if err := agentA.Get(ctx, client.ObjectKey{Namespace: "team", Name: "pull"}, &corev1.Secret{}); !apierrors.IsForbidden(err) {
			t.Errorf("get a Secret in team: %v, want forbidden", err)
		}
		if err := agentA.List(ctx, &shoalv1.PrewarmList{}); !apierrors.IsForbidden(err) {
			t.Errorf("list Prewarms: %v, want forbidden", err)
		}
	})
}
