package manifests_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/test/kubetest"
)

// TestKustomizeDefaultApplies builds config/default with kubectl kustomize and applies every
// object to a real API server (the namespace for real, the rest with server-side dry-run): the
// install without Helm is complete and valid, and runs the chart's own workloads.
func TestKustomizeDefaultApplies(t *testing.T) {
	env := kubetest.Start(t)
	kubectl := filepath.Join(kubetest.AssetsDir(), "kubectl")
	if _, err := os.Stat(kubectl); err != nil {
		t.Fatalf("kubectl (hack/install-deps.sh builds it): %v", err)
	}
	out, err := exec.CommandContext(t.Context(), kubectl, "kustomize", filepath.Join(configDir(), "default")).Output()
	if err != nil {
		t.Fatalf("kubectl kustomize config/default: %v", err)
	}
	path := filepath.Join(t.TempDir(), "default.yaml")
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
	objs := readObjects(t, path)
	kinds := map[string]int{}
	for _, u := range objs {
		kinds[u.GetKind()]++
		opts := []client.ApplyOption{client.FieldOwner("kustomize-test")}
		if u.GetKind() != "Namespace" {
			opts = append(opts, client.DryRunAll)
		}
		if err := env.Client.Apply(t.Context(), client.ApplyConfigurationFromUnstructured(u), opts...); err != nil {
			t.Errorf("%s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
		if u.GetKind() != "Namespace" && u.GetKind() != "CustomResourceDefinition" && !strings.HasPrefix(u.GetKind(), "Cluster") &&
			!strings.HasPrefix(u.GetKind(), "ValidatingAdmission") && u.GetNamespace() != "shoal-system" {
			t.Errorf("%s %s is in namespace %q, want shoal-system", u.GetKind(), u.GetName(), u.GetNamespace())
		}
	}
	for kind, want := range map[string]int{"CustomResourceDefinition": 4, "DaemonSet": 1, "Deployment": 1, "ServiceAccount": 2, "ClusterRoleBinding": 2, "ValidatingAdmissionPolicy": 1} {
		if kinds[kind] != want {
			t.Errorf("%d %s objects, want %d (all: %v)", kinds[kind], kind, want, kinds)
		}
	}
}
