// Package chart tests the Helm chart in charts/shoal without a cluster of kubelets: helm lint,
// the values schema, and every object it renders, with default and other values, applied with
// server-side dry-run to a real kube-apiserver.
package chart

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/kubetest"
)

const namespace = "shoal-system"

// chartDir is charts/shoal in the source tree this test was built from.
func chartDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "charts", "shoal")
}

// helmBinary is the helm that hack/install-deps.sh installs, else the one on PATH.
func helmBinary(t *testing.T) string {
	t.Helper()
	if cache, err := harness.CacheDir(); err == nil {
		if bin := filepath.Join(cache, "bin", "helm"); fileExists(bin) {
			return bin
		}
	}
	bin, err := exec.LookPath("helm")
	if err != nil {
		t.Fatalf("no helm (run hack/install-deps.sh): %v", err)
	}
	return bin
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// helm runs helm with args and returns its output; err carries stderr.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(t.Context(), helmBinary(t), args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	if err := cmd.Run(); err != nil {
		return out.String(), errors.New(strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// render runs helm template with the values given as --set arguments.
func render(t *testing.T, set ...string) ([]*unstructured.Unstructured, error) {
	t.Helper()
	args := []string{"template", "shoal", chartDir(), "--namespace", namespace, "--kube-version", kubetest.DefaultK8sVersion}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	out, err := helm(t, args...)
	if err != nil {
		return nil, err
	}
	objs, err := kubetest.DecodeObjects(strings.NewReader(out))
	if err != nil {
		t.Fatalf("rendered YAML: %v", err)
	}
	return objs, nil
}

func TestChartLints(t *testing.T) {
	if out, err := helm(t, "lint", "--strict", chartDir(), "--kube-version", kubetest.DefaultK8sVersion); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
}

// nonDefault are values that change every part of the chart that has a switch.
var nonDefault = []string{
	"image.repository=registry.example/shoal", "image.tag=v9.9.9", "logLevel=debug",
	"agent.mirroredRegistries={docker.io,ghcr.io,registry.example:5000}",
	"agent.registryEndpoints.registry\\.example=https://10.0.0.5:5000",
	"agent.registryCredentialsSecret=upstream-creds", "agent.cacheSize=200Gi",
	"agent.maxUploadRate=100Mi", "agent.runtimeImport=false", "agent.p2pPort=7171",
	"agent.nodeSelector.pool=gpu", "agent.containerd.hostsDir=/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
	"controller.replicas=1", "controller.prewarmNamespaces={ml,batch}", "controller.maxPinnedBytesPerNode=500Gi",
	"controller.seedPods=false", "controller.pullTokens=false", "agentOwnNodePolicy=false",
	"registryCAConfigMap=registry-ca", "kubernetesServiceHost=10.0.0.1", "kubernetesServicePort=6443",
	"agent.extraArgs={--log-format=json}", "cleanupOnUninstall=false",
}

// TestChartAppliesToTheAPIServer renders the chart with default and other values and applies
// every object with server-side dry-run to a real API server: each must be valid there.
func TestChartAppliesToTheAPIServer(t *testing.T) {
	env := kubetest.Start(t)
	ns := &unstructured.Unstructured{}
	ns.SetAPIVersion("v1")
	ns.SetKind("Namespace")
	ns.SetName(namespace)
	if err := env.Client.Create(t.Context(), ns); err != nil {
		t.Fatal(err)
	}
	for name, set := range map[string][]string{"default values": nil, "other values": nonDefault} {
		t.Run(name, func(t *testing.T) {
			objs, err := render(t, set...)
			if err != nil {
				t.Fatal(err)
			}
			kinds := map[string]int{}
			for _, o := range objs {
				kinds[o.GetKind()]++
				if err := env.Client.Apply(t.Context(), client.ApplyConfigurationFromUnstructured(o), client.DryRunAll, client.ForceOwnership, client.FieldOwner("chart-test")); err != nil {
					t.Errorf("%s %s: %v", o.GetKind(), o.GetName(), err)
				}
			}
			for _, kind := range []string{"CustomResourceDefinition", "Deployment", "DaemonSet", "ClusterRole", "Role", "ServiceAccount"} {
				if kinds[kind] == 0 {
					t.Errorf("no %s rendered (%v)", kind, kinds)
				}
			}
			wantPolicy := name == "default values"
			if got := kinds["ValidatingAdmissionPolicy"] == 1; got != wantPolicy {
				t.Errorf("admission policy rendered: %v, want %v", got, wantPolicy)
			}
		})
	}
}

// TestChartObjects checks what the rendered agent and controller are allowed and given.
func TestChartObjects(t *testing.T) {
	// The agent's DaemonSet and the controller's Deployment (not the uninstall hook's DaemonSet).
	find := func(objs []*unstructured.Unstructured, kind string) map[string]any {
		for _, o := range objs {
			if o.GetKind() == kind && (o.GetName() == "shoal-agent" || o.GetName() == "shoal-controller") {
				spec, _, _ := unstructured.NestedMap(o.Object, "spec", "template", "spec")
				return spec
			}
		}
		t.Fatalf("no %s", kind)
		return nil
	}
	container := func(spec map[string]any) map[string]any {
		cs, _ := spec["containers"].([]any)
		c, _ := cs[0].(map[string]any)
		return c
	}
	mounts := func(c map[string]any) string {
		var paths []string
		vms, _ := c["volumeMounts"].([]any)
		for _, vm := range vms {
			m, _ := vm.(map[string]any)
			p, _ := m["mountPath"].(string)
			paths = append(paths, p)
		}
		return strings.Join(paths, " ")
	}
	def, err := render(t)
	if err != nil {
		t.Fatal(err)
	}
	other, err := render(t, nonDefault...)
	if err != nil {
		t.Fatal(err)
	}

	agent := find(def, "DaemonSet")
	if agent["hostNetwork"] != true {
		t.Error("the agent is not on the host's network: containerd could not reach it on the node's loopback")
	}
	tol, _ := agent["tolerations"].([]any)
	if first, _ := slicesFirst(tol).(map[string]any); len(tol) != 1 || first["operator"] != "Exists" {
		t.Errorf("agent tolerations %v, want every taint tolerated", agent["tolerations"])
	}
	if !strings.Contains(mounts(container(agent)), "/host/containerd.sock") {
		t.Error("runtime import on, but containerd's socket is not mounted")
	}
	if strings.Contains(mounts(container(find(other, "DaemonSet"))), "containerd.sock") {
		t.Error("runtime import off, yet containerd's socket is mounted")
	}
	args := func(c map[string]any) string { return strings.Join(toStrings(c["args"]), " ") }
	if a := args(container(agent)); !strings.Contains(a, "--mirror-addr=127.0.0.1:") || strings.Contains(a, "--pprof") {
		t.Errorf("agent args %q: want the mirror on loopback and no profiling", a)
	}
	if a := args(container(find(other, "DaemonSet"))); !strings.Contains(a, "--registry-auth-file=") || !strings.Contains(a, "--p2p-addr=$(NODE_IP):7171") {
		t.Errorf("agent args with other values %q: the credentials file and the p2p port are missing", a)
	}

	controller := find(def, "Deployment")
	sc, _ := container(controller)["securityContext"].(map[string]any)
	psc, _ := controller["securityContext"].(map[string]any)
	if psc["runAsNonRoot"] != true || sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false {
		t.Errorf("controller security context %v / %v: want non-root, read-only root, no escalation", psc, sc)
	}
	if a := args(container(find(other, "Deployment"))); !strings.Contains(a, "--prewarm-namespaces=ml,batch") || !strings.Contains(a, "--pull-tokens=false") ||
		!strings.Contains(a, "--registry-ca-file=/etc/shoal/registry-ca/ca.crt") {
		t.Errorf("controller args with other values %q", a)
	}
	if a := args(container(find(other, "DaemonSet"))); !strings.Contains(a, "--registry-ca-file=/etc/shoal/registry-ca/ca.crt") || !strings.HasSuffix(a, "--log-format=json") {
		t.Errorf("agent args with other values %q: the registry CA or the extra args are missing", a)
	}
	if m := mounts(container(find(other, "Deployment"))); !strings.Contains(m, "/etc/shoal/registry-ca") {
		t.Errorf("controller mounts with a registry CA: %q", m)
	}

	// The k3s preset puts every containerd path where k3s keeps it.
	k3s, err := render(t, "agent.containerd.preset=k3s")
	if err != nil {
		t.Fatal(err)
	}
	vols := fmt.Sprint(find(k3s, "DaemonSet")["volumes"])
	for _, want := range []string{"/var/lib/rancher/k3s/agent/etc/containerd/certs.d", "/var/lib/rancher/k3s/agent/etc/containerd/config.toml", "/run/k3s/containerd/containerd.sock"} {
		if !strings.Contains(vols, want) {
			t.Errorf("k3s preset: the agent's volumes %s lack %s", vols, want)
		}
	}
	if a := args(container(find(k3s, "DaemonSet"))); !strings.Contains(a, "--containerd-hosts-dir-on-host=/var/lib/rancher/k3s/agent/etc/containerd/certs.d") {
		t.Errorf("k3s preset: agent args %q", a)
	}

	// The uninstall hook: a DaemonSet that cleans up where the agents ran, and a Job Helm waits for.
	hooks := map[string]bool{}
	for _, o := range def {
		if o.GetAnnotations()["helm.sh/hook"] == "post-delete" {
			hooks[o.GetKind()+"/"+o.GetName()] = true
		}
	}
	for _, want := range []string{"DaemonSet/shoal-cleanup", "Job/shoal-cleanup", "ServiceAccount/shoal-cleanup", "Role/shoal-cleanup", "RoleBinding/shoal-cleanup"} {
		if !hooks[want] {
			t.Errorf("uninstall hook %s not rendered (hooks: %v)", want, hooks)
		}
	}
	for _, o := range other {
		if o.GetAnnotations()["helm.sh/hook"] != "" {
			t.Errorf("cleanupOnUninstall=false, yet hook %s/%s is rendered", o.GetKind(), o.GetName())
		}
	}
}

func slicesFirst(items []any) any {
	if len(items) == 0 {
		return nil
	}
	return items[0]
}

func toStrings(v any) []string {
	items, _ := v.([]any)
	out := make([]string, 0, len(items))
	for _, it := range items {
		s, _ := it.(string)
		out = append(out, s)
	}
	return out
}

// TestValuesSchemaRejectsBadValues: values the agent or the controller would refuse, or that
// would render a broken object, are refused by helm with the value's path.
func TestValuesSchemaRejectsBadValues(t *testing.T) {
	for _, tc := range []struct{ set, path string }{
		{"agent.cacheSize=lots", "/agent/cacheSize"},
		{"agent.mirroredRegistries[0]=bad host!", "/agent/mirroredRegistries/0"},
		{"agent.p2pPort=70000", "/agent/p2pPort"},
		{"agent.maxPinnedShare=1.5", "/agent/maxPinnedShare"},
		{"agent.containerd.hostsDir=relative/path", "/agent/containerd/hostsDir"},
		{"agent.registryEndpoints.registry\\.example=ftp://x", "/agent/registryEndpoints"},
		{"logLevel=verbose", "/logLevel"},
		{"controller.replicas=0", "/controller/replicas"},
		{"controller.prewarmNamespaces[0]=Not_A_Namespace", "/controller/prewarmNamespaces/0"},
		{"agent.cacheSzie=1Gi", "cacheSzie"},
		{"registryCAConfigMap=Not_A_Name", "/registryCAConfigMap"},
		{"agent.containerd.preset=microk8s", "/agent/containerd/preset"},
		{"agent.extraArgs[0]=not-a-flag", "/agent/extraArgs/0"},
		{"kubernetesServiceHost=a b", "/kubernetesServiceHost"},
		{"agent.livenessProbe.terminationGracePeriodSeconds=0", "/agent/livenessProbe/terminationGracePeriodSeconds"},
	} {
		_, err := render(t, tc.set)
		if err == nil || !strings.Contains(err.Error(), tc.path) {
			t.Errorf("--set %s: %v; want an error naming %s", tc.set, err, tc.path)
		}
	}
}

// TestMonitoringObjects renders the optional Prometheus Operator objects and the dashboard: off
// by default; when on, a ServiceMonitor for the agents' and the controller's metrics Services,
// alerts on the agents' series, and a dashboard ConfigMap that holds valid JSON querying them.
func TestMonitoringObjects(t *testing.T) {
	def, err := render(t)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range def {
		if k := o.GetKind(); k == "ServiceMonitor" || k == "PrometheusRule" || o.GetName() == "shoal-dashboard" || o.GetName() == "shoal-agent-metrics" {
			t.Errorf("monitoring is off by default, yet %s %s is rendered", k, o.GetName())
		}
	}
	on, err := render(t, "monitoring.serviceMonitor.enabled=true", "monitoring.prometheusRule.enabled=true", "monitoring.dashboard.enabled=true",
		"monitoring.serviceMonitor.labels.release=prom")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*unstructured.Unstructured{}
	for _, o := range on {
		got[o.GetKind()+"/"+o.GetName()] = o
	}
	if sm := got["ServiceMonitor/shoal"]; sm == nil || sm.GetLabels()["release"] != "prom" {
		t.Errorf("ServiceMonitor: %v", sm)
	}
	svc := got["Service/shoal-agent-metrics"]
	if svc == nil {
		t.Fatal("no Service for the agents' metrics")
	}
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	if first, _ := slicesFirst(ports).(map[string]any); len(ports) != 1 || first["name"] != "metrics" {
		t.Errorf("agent metrics Service ports %v, want one named metrics (what the ServiceMonitor scrapes)", ports)
	}
	rule := got["PrometheusRule/shoal"]
	if rule == nil {
		t.Fatal("no PrometheusRule")
	}
	groups, _, _ := unstructured.NestedSlice(rule.Object, "spec", "groups")
	alerts := map[string]string{}
	for _, g := range groups {
		rules, _ := g.(map[string]any)["rules"].([]any)
		for _, r := range rules {
			m, _ := r.(map[string]any)
			name, _ := m["alert"].(string)
			expr, _ := m["expr"].(string)
			alerts[name] = expr
		}
	}
	for _, want := range []string{"ShoalAgentDown", "ShoalMirrorFallingBack", "ShoalNodeCacheItemsFailed"} {
		if alerts[want] == "" {
			t.Errorf("alert %s missing (alerts: %v)", want, alerts)
		}
	}
	cm := got["ConfigMap/shoal-dashboard"]
	if cm == nil {
		t.Fatal("no dashboard ConfigMap")
	}
	data, _, _ := unstructured.NestedString(cm.Object, "data", "shoal.json")
	var dash struct {
		Panels []struct {
			Targets []struct{ Expr string } `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal([]byte(data), &dash); err != nil || len(dash.Panels) == 0 {
		t.Fatalf("dashboard JSON: %v (%d panels)", err, len(dash.Panels))
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			if !strings.Contains(tg.Expr, "shoal_") {
				t.Errorf("dashboard query %q reads no Shoal series", tg.Expr)
			}
		}
	}
}

// TestConfigurationDocListsEveryValue: every value of values.yaml (maps of free keys, such as
// registryEndpoints, counted as one) has a row in docs/configuration.md, and every row names a
// value that exists.
func TestConfigurationDocListsEveryValue(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(chartDir(), "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var values map[string]any
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	freeKeys := map[string]bool{"registryEndpoints": true, "nodeSelector": true, "labels": true, "resources": true, "updateStrategy": true, "livenessProbe": true}
	var leaves []string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			if sub, ok := v.(map[string]any); ok && len(sub) > 0 && !freeKeys[k] {
				walk(prefix+k+".", sub)
				continue
			}
			leaves = append(leaves, prefix+k)
		}
	}
	walk("", values)
	doc, err := os.ReadFile(filepath.Join(chartDir(), "..", "..", "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for line := range strings.SplitSeq(string(doc), "\n") {
		key, ok := strings.CutPrefix(line, "| `")
		if !ok || strings.HasPrefix(key, "--") {
			continue
		}
		key, _, _ = strings.Cut(key, "`")
		// "a.b, a.c" and "a.b.enabled, .interval" name several values of one row.
		var parent string
		for i, k := range strings.Split(key, ", ") {
			if strings.HasPrefix(k, ".") {
				k = parent + k
			} else if i == 0 {
				parent = k[:max(strings.LastIndex(k, "."), 0)]
			}
			documented[k] = true
		}
	}
	for _, leaf := range leaves {
		if !documented[leaf] {
			t.Errorf("docs/configuration.md: no row for the value %s", leaf)
		}
		delete(documented, leaf)
	}
	for k := range documented {
		t.Errorf("docs/configuration.md documents the value %s, which values.yaml does not have", k)
	}
}
