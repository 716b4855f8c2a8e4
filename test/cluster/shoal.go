package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shoal-dev/shoal/internal/imagebuild"
	"github.com/shoal-dev/shoal/test/harness"
)

// ShoalRepository is where PushShoalImage puts Shoal's image in the cluster's registry.
const ShoalRepository = "shoal"

// ReleaseNamespace is the namespace InstallShoal installs into.
const ReleaseNamespace = "shoal-system"

// PushShoalImage builds Shoal's image from the static binary (as make image does) and pushes
// it to the cluster's registry as shoal:tag.
func (c *Cluster) PushShoalImage(ctx context.Context, binary, tag string) (*harness.Image, error) {
	img, err := imagebuild.Shoal(binary, "/etc/ssl/certs/ca-certificates.crt", tag, runtime.GOARCH)
	if err != nil {
		return nil, err
	}
	return harness.PushV1Image(ctx, c.tb.RegistryHost(), ShoalRepository+":"+tag, img)
}

// Helm runs the helm client (hack/install-deps.sh puts it in the cache) against the cluster.
func (c *Cluster) Helm(ctx context.Context, args ...string) ([]byte, error) {
	cache, err := harness.CacheDir()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(cache, "bin", "helm"), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	cmd.Env = append(harness.ChildEnv(), "HELM_CACHE_HOME="+filepath.Join(c.dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(c.dir, "helm", "config"), "HELM_DATA_HOME="+filepath.Join(c.dir, "helm", "data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

// Kubectl runs kubectl against the cluster as its admin.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.KubectlBinary(), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	cmd.Env = harness.ChildEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

// ShoalValues are the chart values that fit the local cluster: Shoal's image from the cluster's
// registry, the API server's real address (no kube-proxy), registry.test mirrored and where it
// is really served, and one controller replica.
func (c *Cluster) ShoalValues(tag string) []string {
	reg := c.registryURL
	values := []string{
		"image.repository=" + RegistryName + "/" + ShoalRepository,
		"image.tag=" + tag,
		"kubernetesServiceHost=" + c.APIServerHost(),
		"kubernetesServicePort=" + strconv.Itoa(APIServerPort),
		"agent.mirroredRegistries={" + RegistryName + "}",
		`agent.registryEndpoints.registry\.test=` + reg,
		`controller.registryEndpoints.registry\.test=` + reg,
		"agent.cacheSize=4Gi",
		"controller.replicas=1",
	}
	if c.cfg.registryTLS {
		values = append(values, "registryCAConfigMap="+registryCAConfigMap)
	}
	return values
}

// registryCAConfigMap holds the cluster's CA for Shoal, with WithRegistryTLS.
const registryCAConfigMap = "registry-ca"

// createRegistryCA creates the release's namespace and the ConfigMap of the cluster's CA in it.
func (c *Cluster) createRegistryCA(ctx context.Context) error {
	ca, err := os.ReadFile(c.CAFile())
	if err != nil {
		return err
	}
	_, err = c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ReleaseNamespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	_, err = c.client.CoreV1().ConfigMaps(ReleaseNamespace).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: registryCAConfigMap},
		Data:       map[string]string{"ca.crt": string(ca)},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// InstallShoal installs the chart at chartDir as release "shoal" in shoal-system with
// ShoalValues(tag) and extra --set values, and waits (helm --wait) until its workloads are ready.
func (c *Cluster) InstallShoal(ctx context.Context, chartDir, tag string, set ...string) ([]byte, error) {
	if _, err := os.Stat(filepath.Join(chartDir, "Chart.yaml")); err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	if c.cfg.registryTLS {
		if err := c.createRegistryCA(ctx); err != nil {
			return nil, fmt.Errorf("registry CA: %w", err)
		}
	}
	args := []string{"upgrade", "--install", "shoal", chartDir, "--namespace", ReleaseNamespace, "--create-namespace", "--wait", "--timeout", c.cfg.helmTimeout.String()}
	for _, v := range append(c.ShoalValues(tag), set...) {
		args = append(args, "--set", v)
	}
	return c.Helm(ctx, args...)
}

// PrewarmPinned applies a Prewarm named name, in the default namespace, of image for every
// node, imported into containerd and pinned, and waits up to timeout until it is Ready.
func (c *Cluster) PrewarmPinned(ctx context.Context, name, image string, timeout time.Duration) error {
	manifest := filepath.Join(c.dir, "prewarm-"+name+".yaml")
	yaml := fmt.Sprintf("apiVersion: shoal.dev/v1alpha1\nkind: Prewarm\nmetadata:\n  name: %s\n  namespace: default\nspec:\n  images: [%q]\n  runtimeImport: Pinned\n", name, image)
	if err := os.WriteFile(manifest, []byte(yaml), 0o644); err != nil {
		return err
	}
	if out, err := c.Kubectl(ctx, "apply", "-f", manifest); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	if out, err := c.Kubectl(ctx, "wait", "prewarm/"+name, "--for=condition=Ready", "--timeout="+timeout.String()); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}
