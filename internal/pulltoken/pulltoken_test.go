package pulltoken

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

func TestNameIsOneForEverySpellingOfARepository(t *testing.T) {
	if Name("index.docker.io/library/nginx") != Name("docker.io/library/nginx") ||
		Name("Registry.Test/team/app") != Name("registry.test/team/app") {
		t.Error("spellings of one repository give different names")
	}
	if Name("registry.test/team/app") == Name("registry.test/team/other") {
		t.Error("two repositories share a name")
	}
	if n := Name("registry.test/team/app"); len(n) > 63 || !strings.HasPrefix(n, "shoal-pull-") {
		t.Errorf("name %q: want shoal-pull-… within 63 characters", n)
	}
}

func TestSecretRoundTrip(t *testing.T) {
	issued := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	for _, c := range []Credential{
		{Repository: "registry.test/team/app", Token: "t0k", Issued: issued, Expires: issued.Add(5 * time.Minute)},
		{Repository: "registry.test/team/app", Username: "puller", Password: "pa:ss", Issued: issued, Expires: issued.Add(10 * time.Minute)},
	} {
		s, err := Secret("shoal-system", c)
		if err != nil {
			t.Fatal(err)
		}
		if s.Type != corev1.SecretTypeDockerConfigJson || s.Labels[Label] != "true" || s.Namespace != "shoal-system" {
			t.Errorf("secret %+v", s.ObjectMeta)
		}
		got, err := Parse(s)
		if err != nil || got != c {
			t.Errorf("round trip: %+v, %v; want %+v", got, err, c)
		}
		if want := issued.Add(c.Expires.Sub(issued) / 2); !got.RefreshAt().Equal(want) {
			t.Errorf("refresh at %v, want halfway %v", got.RefreshAt(), want)
		}
	}
	if _, err := Secret("ns", Credential{Repository: "registry.test/a"}); err == nil {
		t.Error("a Secret with no credential")
	}
}

func TestParseRefusesMalformedSecrets(t *testing.T) {
	good, err := Secret("ns", Credential{Repository: "registry.test/a", Token: "t", Issued: time.Unix(0, 0), Expires: time.Unix(60, 0)})
	if err != nil {
		t.Fatal(err)
	}
	for name, edit := range map[string]func(*corev1.Secret){
		"no expiry": func(s *corev1.Secret) { delete(s.Annotations, ExpiresAnnotation) },
		"bad json":  func(s *corev1.Secret) { s.Data[corev1.DockerConfigJsonKey] = []byte("{") },
		"two registries": func(s *corev1.Secret) {
			s.Data[corev1.DockerConfigJsonKey] = []byte(`{"auths":{"a":{"registrytoken":"x"},"b":{"registrytoken":"y"}}}`)
		},
		"auth not base64": func(s *corev1.Secret) { s.Data[corev1.DockerConfigJsonKey] = []byte(`{"auths":{"a":{"auth":"%%"}}}`) },
		"auth without colon": func(s *corev1.Secret) {
			s.Data[corev1.DockerConfigJsonKey] = []byte(`{"auths":{"a":{"auth":"dXNlcg=="}}}`)
		},
	} {
		s := good.DeepCopy()
		edit(s)
		if _, err := Parse(s); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}
