// Package kubeenv starts a real kube-apiserver and etcd (controller-runtime's envtest) with
// Shoal's CRDs installed, for tests (through test/kubetest) and for development commands such as
// hack/scalebench, which must not link the testing package.
//
// The binaries come from KUBEBUILDER_ASSETS, which the Makefile sets to the directory that
// hack/install-deps.sh fills (kube-apiserver built from the Go module proxy, etcd from Debian);
// without it, from that directory's default place under ~/.cache/shoal. Both listen on loopback
// unless told otherwise.
package kubeenv

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
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

// ErrNoAssets means the assets directory has no kube-apiserver: `make deps` never ran here, or
// KUBEBUILDER_ASSETS points elsewhere.
var ErrNoAssets = errors.New("no kube-apiserver binary")

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

// CRDDir is the directory of the generated CRDs (config/crd/bases) in the source tree this
// package was built from.
func CRDDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "config", "crd", "bases")
}

// Options change how the API server runs.
type Options struct {
	// ListenAddress is the IP the API server serves on (default 127.0.0.1), e.g. the testbed's
	// bridge address, which agents in node namespaces reach. Its serving certificate names it.
	ListenAddress string
	// APIServerFlags are further kube-apiserver flags, by name without dashes (e.g.
	// "audit-log-path"); they override envtest's defaults.
	APIServerFlags map[string]string
}

// Start starts etcd and kube-apiserver and installs Shoal's CRDs. The caller stops both with
// Stop. An error wraps ErrNoAssets when the assets directory has no kube-apiserver.
func Start(opts Options) (*Env, error) {
	assets := AssetsDir()
	if _, err := os.Stat(filepath.Join(assets, "kube-apiserver")); err != nil {
		return nil, fmt.Errorf("%w in %s (run make deps, or set KUBEBUILDER_ASSETS): %w", ErrNoAssets, assets, err)
	}
	scheme, err := controllers.Scheme()
	if err != nil {
		return nil, err
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
	if opts.ListenAddress != "" || len(opts.APIServerFlags) > 0 {
		api := &envtest.APIServer{}
		if opts.ListenAddress != "" {
			// envtest picks a loopback address unless given a port too.
			port, err := freePort(opts.ListenAddress)
			if err != nil {
				return nil, err
			}
			api.Address = opts.ListenAddress
			api.Port = port
			api.Configure().Set("advertise-address", opts.ListenAddress)
			// Clients in other namespaces hold watches open; the API server drains them on
			// the way out, longer than envtest's default 20 s.
			env.ControlPlaneStopTimeout = 2 * time.Minute
		}
		for name, value := range opts.APIServerFlags {
			api.Configure().Set(name, value)
		}
		env.ControlPlane.APIServer = api
	}
	cfg, err := env.Start()
	if err != nil {
		// envtest leaves running what it started when a later step (the CRDs) fails.
		return nil, errors.Join(fmt.Errorf("start kube-apiserver and etcd from %s: %w", assets, err), env.Stop())
	}
	e := &Env{Config: cfg, Scheme: scheme, KubeConfig: env.KubeConfig, CRDs: env.CRDs, env: env}
	if e.Client, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		return nil, errors.Join(fmt.Errorf("client for the API server: %w", err), e.Stop())
	}
	return e, nil
}

// freePort is a TCP port on addr that was free a moment ago.
func freePort(addr string) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		return "", fmt.Errorf("a port on %s for the API server: %w", addr, err)
	}
	_, port, err := net.SplitHostPort(l.Addr().String())
	if cerr := l.Close(); err == nil {
		err = cerr
	}
	return port, err
}

// AddUser provisions a user of the API server, authenticated by a client certificate and
// member of groups (e.g. "system:masters"), and returns a REST config and a kubeconfig file's
// content for it. Requests it makes carry its name in the API server's audit log.
func (e *Env) AddUser(name string, groups ...string) (*rest.Config, []byte, error) {
	user, err := e.env.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("add API server user %s: %w", name, err)
	}
	kubeconfig, err := user.KubeConfig()
	if err != nil {
		return nil, nil, fmt.Errorf("kubeconfig of user %s: %w", name, err)
	}
	return user.Config(), kubeconfig, nil
}

// Stop stops the API server and etcd (by their process ids) and removes their directories;
// stopping again does nothing.
func (e *Env) Stop() error {
	e.stopOnce.Do(func() { e.stopErr = e.env.Stop() })
	return e.stopErr
}
