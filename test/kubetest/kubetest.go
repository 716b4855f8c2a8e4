// Package kubetest starts a real kube-apiserver and etcd for a test (controller-runtime's envtest)
// with Shoal's CRDs installed, and stops them when the test ends. It is test/kubeenv bound to a
// testing.TB.
//
// The binaries come from KUBEBUILDER_ASSETS, which the Makefile sets to the directory that
// hack/install-deps.sh fills (kube-apiserver built from the Go module proxy, etcd from Debian);
// without it, from that directory's default place under ~/.cache/shoal. Both listen on loopback
// only.
package kubetest

import (
	"errors"
	"os"
	"testing"

	"github.com/shoal-dev/shoal/test/kubeenv"
)

// DefaultK8sVersion is the Kubernetes release whose kube-apiserver hack/install-deps.sh builds.
const DefaultK8sVersion = kubeenv.DefaultK8sVersion

// Env is a running API server with Shoal's CRDs.
type Env = kubeenv.Env

// Options change how the API server runs.
type Options = kubeenv.Options

// AssetsDir is where the kube-apiserver and etcd binaries are: KUBEBUILDER_ASSETS, or the place
// hack/install-deps.sh puts them.
func AssetsDir() string { return kubeenv.AssetsDir() }

// CRDDir is the directory of the generated CRDs (config/crd/bases).
func CRDDir() string { return kubeenv.CRDDir() }

// Start starts etcd and kube-apiserver, installs Shoal's CRDs and stops both when the test ends.
// A test that cannot run them fails, with one exception that is reported as a skip: go test run
// by hand, outside make, on a machine where `make deps` never ran.
func Start(t testing.TB) *Env {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, opts Options) *Env {
	t.Helper()
	e, err := kubeenv.Start(opts)
	if errors.Is(err, kubeenv.ErrNoAssets) && os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Stop(); err != nil {
			t.Errorf("stop kube-apiserver and etcd: %v", err)
		}
	})
	return e
}
