package manifests_test

import (
	"path/filepath"
	"testing"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/test/kubetest"
)

// TestSamplesApply applies every object of config/samples with server-side dry-run to a real
// API server with Shoal's CRDs: the samples users copy must pass the CRDs' validation.
func TestSamplesApply(t *testing.T) {
	env := kubetest.Start(t)
	paths, err := filepath.Glob(filepath.Join(configDir(), "samples", "*.yaml"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no samples in %s: %v", filepath.Join(configDir(), "samples"), err)
	}
	for _, path := range paths {
		for _, u := range readObjects(t, path) {
			if err := env.Client.Apply(t.Context(), client.ApplyConfigurationFromUnstructured(u), client.DryRunAll, client.FieldOwner("samples-test")); err != nil {
				t.Errorf("%s: %s %s: %v", filepath.Base(path), u.GetKind(), u.GetName(), err)
			}
		}
	}
}
