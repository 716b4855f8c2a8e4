package manifests_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
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
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			u := &unstructured.Unstructured{}
			if err := dec.Decode(&u.Object); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				t.Fatalf("%s: %v", path, err)
			}
			if len(u.Object) == 0 {
				continue
			}
			if err := env.Client.Apply(t.Context(), client.ApplyConfigurationFromUnstructured(u), client.DryRunAll, client.FieldOwner("samples-test")); err != nil {
				t.Errorf("%s: %s %s: %v", filepath.Base(path), u.GetKind(), u.GetName(), err)
			}
		}
	}
}
