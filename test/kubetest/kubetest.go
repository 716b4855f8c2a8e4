// Package kubetest starts a real kube-apiserver and etcd for a test (controller-runtime's envtest)
// with Shoal's CRDs installed, and stops them when the test ends.
//
// The binaries come from KUBEBUILDER_ASSETS, which the Makefile sets to the directory that
// hack/install-deps.sh fills (kube-apiserver built from the Go module proxy, etcd from Debian);
// without it, from that directory's default place under ~/.cache/shoal. Both listen on loopback
// only.
package kubetest

import (
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/shoal-dev/shoal/controllers"
)

// DefaultK8sVersion is the Kubernetes release whose kube-apiserver hack/install-deps.sh builds.
const DefaultK8sVersion = "1.37.1"

// Env is a running API server with Shoal's CRDs.
type Env struct {
	// Config reaches the API server as a cluster admin.
	Config *rest.Config
	// Client is a client for Config that knows Shoal's and Kubernetes' built-in types.
	Client client.Client
	// Scheme holds Shoal's and Kubernetes' built-in types.
	Scheme *k8sruntime.Scheme
	// KubeConfig is a kubeconfig file's content for Config, for commands under test.
	KubeConfig []byte
	// CRDs are the CustomResourceDefinitions that were installed.
	CRDs []*apiextensionsv1.CustomResourceDefinition

	env      *envtest.Environment
	stopOnce sync.Once
	stopErr  error
}

// AssetsDir is where the kube-apiserver and etcd binaries are: KUBEBUILDER_ASSETS, or the place
// hack/install-deps.sh puts them.
func AssetsDir() string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".cache", "shoal", "k8s", DefaultK8sVersion)
}

// CRDDir is the directory of the generated CRDs (config/crd/bases).
func CRDDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "config", "crd", "bases")
}

// Options change where the API server listens.
type Options struct {
	// ListenAddress is the IP the API server serves on (default 127.0.0.1), e.g. the testbed's
	// bridge address, which agents in node namespaces reach. Its serving certificate names it.
	ListenAddress string
}

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
	assets := AssetsDir()
	if _, err := os.Stat(filepath.Join(assets, "kube-apiserver")); err != nil {
		if os.Getenv("KUBEBUILDER_ASSETS") == "" {
			t.Skipf("no kube-apiserver in %s (run make deps, or the tests through make): %v", assets, err)
		}
		t.Fatalf("KUBEBUILDER_ASSETS=%s has no kube-apiserver: %v", assets, err)
	}
	scheme, err := controllers.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	// controller-runtime logs through a global logger that complains, with a stack trace,
	// when nobody set it; envtest's own progress messages are not wanted here.
	ctrllog.SetLogger(logr.Discard())
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{CRDDir()},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
	}
	if opts.ListenAddress != "" {
		// envtest picks a loopback address unless given a port too.
		l, err := net.Listen("tcp", net.JoinHostPort(opts.ListenAddress, "0"))
		if err != nil {
			t.Fatalf("a port on %s for the API server: %v", opts.ListenAddress, err)
		}
		_, port, err := net.SplitHostPort(l.Addr().String())
		_ = l.Close()
		if err != nil {
			t.Fatal(err)
		}
		api := &envtest.APIServer{}
		api.Address = opts.ListenAddress
		api.Port = port
		api.Configure().Set("advertise-address", opts.ListenAddress)
		env.ControlPlane.APIServer = api
		// Clients in other namespaces hold watches open; the API server drains them on the way
		// out, longer than envtest's default 20 s.
		env.ControlPlaneStopTimeout = 2 * time.Minute
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start kube-apiserver and etcd from %s: %v", assets, err)
	}
	e := &Env{Config: cfg, Scheme: scheme, KubeConfig: env.KubeConfig, CRDs: env.CRDs, env: env}
	t.Cleanup(func() {
		if err := e.Stop(); err != nil {
			t.Errorf("stop kube-apiserver and etcd: %v", err)
		}
	})
	if e.Client, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		t.Fatal(err)
	}
	return e
}

// Stop stops the API server and etcd before the test ends, e.g. to show that agents keep
// working without them; stopping again does nothing.
func (e *Env) Stop() error {
	e.stopOnce.Do(func() { e.stopErr = e.env.Stop() })
	return e.stopErr
}
