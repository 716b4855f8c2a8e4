package upstream_test

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// seriesLabels returns, for each series of family, its labels.
func seriesLabels(t *testing.T, reg *prometheus.Registry, family string) []map[string]string {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var series []map[string]string
	for _, f := range families {
		if f.GetName() != family {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			series = append(series, labels)
		}
	}
	return series
}

// registryValues returns the distinct values of the registry label of family.
func registryValues(t *testing.T, reg *prometheus.Registry, family string) map[string]bool {
	t.Helper()
	values := map[string]bool{}
	for _, labels := range seriesLabels(t, reg, family) {
		values[labels["registry"]] = true
	}
	return values
}

// TestRegistryLabelIsBounded sends requests for 1000 registries, every one of which answers
// (as an agent mirroring "*" would for names that clients make up and a wildcard DNS serves):
// the metrics name at most MaxRegistryLabels of them and count the rest under "other". A
// registry that was checked (configured) is named even though it never answers; one that was
// neither checked nor reached is not.
func TestRegistryLabelIsBounded(t *testing.T) {
	const registries = 1000
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			w.WriteHeader(http.StatusOK)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}`))
	}))
	t.Cleanup(srv.Close)
	answering := upstream.Endpoint{Scheme: "http", Host: strings.TrimPrefix(srv.URL, "http://")}
	silent := upstream.Endpoint{Scheme: "http", Host: freeAddr(t)} // nothing listens there
	reg := prometheus.NewRegistry()
	c := upstream.New(upstream.WithRegisterer(reg), upstream.WithEndpointResolver(func(registry string) (upstream.Endpoint, error) {
		if registry == "configured.test" || registry == "unknown.test" {
			return silent, nil
		}
		return answering, nil
	}))
	t.Cleanup(c.CloseIdleConnections)

	if err := c.Check("configured.test"); err != nil {
		t.Fatalf("Check: %v", err)
	}
	for _, registry := range []string{"configured.test", "unknown.test"} {
		if _, err := c.Manifest(testContext(t), registry, "app", "v1", nil); !errors.Is(err, upstream.ErrUnavailable) {
			t.Fatalf("%s: err = %v, want ErrUnavailable", registry, err)
		}
	}
	for i := range registries {
		registry := fmt.Sprintf("r%d.test", i)
		if _, err := c.Manifest(testContext(t), registry, "app", "v1", nil); !errors.Is(err, upstream.ErrNotFound) {
			t.Fatalf("%s: err = %v, want ErrNotFound", registry, err)
		}
	}

	for _, family := range []string{"shoal_upstream_requests_total", "shoal_upstream_request_duration_seconds"} {
		values := registryValues(t, reg, family)
		if len(values) > upstream.MaxRegistryLabels+1 {
			t.Errorf("%s has %d registry label values, want at most %d", family, len(values), upstream.MaxRegistryLabels+1)
		}
		for _, want := range []string{"configured.test", "r0.test", fmt.Sprintf("r%d.test", upstream.MaxRegistryLabels-2), "other"} {
			if !values[want] {
				t.Errorf("%s has no series for registry %q", family, want)
			}
		}
		for _, unwanted := range []string{"unknown.test", fmt.Sprintf("r%d.test", upstream.MaxRegistryLabels-1), fmt.Sprintf("r%d.test", registries-1)} {
			if values[unwanted] {
				t.Errorf("%s names registry %q", family, unwanted)
			}
		}
	}
	var other float64
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			if f.GetName() == "shoal_upstream_requests_total" && matches(m, map[string]string{"registry": "other", "kind": "manifest"}) {
				other += m.GetCounter().GetValue()
			}
		}
	}
	// unknown.test never got as far as a manifest request: its handshake failed.
	if want := float64(registries - (upstream.MaxRegistryLabels - 1)); other != want {
		t.Errorf("manifest requests counted under other = %v, want %v", other, want)
	}
}

// TestCodeLabel checks the code label: the status when it is a common one, its class when not,
// "none" when there was no answer.
func TestCodeLabel(t *testing.T) {
	host := fakeRegistry(t, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusTeapot)
	})
	reg := prometheus.NewRegistry()
	c := newClient(host, upstream.WithRegisterer(reg))
	t.Cleanup(c.CloseIdleConnections)
	if _, err := c.Manifest(testContext(t), "registry.test", "app", "v1", nil); err == nil {
		t.Fatal("a 418 answer was taken for a manifest")
	}
	down := upstream.New(upstream.WithRegisterer(reg), upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) {
		return upstream.Endpoint{Scheme: "http", Host: freeAddr(t)}, nil
	}))
	t.Cleanup(down.CloseIdleConnections)
	if err := down.Check("down.test"); err != nil {
		t.Fatal(err)
	}
	if _, err := down.Manifest(testContext(t), "down.test", "app", "v1", nil); !errors.Is(err, upstream.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	got := map[string]bool{}
	for _, labels := range seriesLabels(t, reg, "shoal_upstream_requests_total") {
		got[labels["registry"]+" "+labels["kind"]+" "+labels["code"]] = true
	}
	want := map[string]bool{
		"registry.test token 200":    true,
		"registry.test manifest 4xx": true,
		"down.test token none":       true,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("series %v, want %v", got, want)
	}
}
