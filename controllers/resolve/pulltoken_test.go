package resolve

import (
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/shoal-dev/shoal/test/tokenauth"
)

func TestPullCredential(t *testing.T) {
	ctx := t.Context()
	secret := [][]byte{dockerConfigJSON(testRegistryName, "puller", "s3cret")}

	t.Run("a token registry gives a token scoped to pulling the repository", func(t *testing.T) {
		ta := tokenauth.New(registry.New(registry.Logger(log.New(io.Discard, "", 0))), "puller", "s3cret", 5*time.Minute)
		ta.Realm = "http://" + testRegistryName + "/token" // reached through the endpoint mapping
		srv := httptest.NewServer(ta)
		t.Cleanup(srv.Close)
		clk := &fakeClock{now: time.Unix(1_700_000_000, 0)}
		r, err := New(WithEndpoints(map[string]string{testRegistryName: srv.URL}), WithInsecure(testRegistryName), WithClock(clk.Now))
		if err != nil {
			t.Fatal(err)
		}
		c, err := r.PullCredential(ctx, testRegistryName+"/team/app", secret)
		if err != nil {
			t.Fatal(err)
		}
		if c.Token == "" || c.Basic() || !c.Expires.Equal(clk.Now().Add(5*time.Minute)) {
			t.Fatalf("credential %+v; want a token expiring in 5 minutes", c)
		}
		if !ta.Valid(c.Token, "team/app") || ta.Valid(c.Token, "team/other") {
			t.Errorf("the token is not scoped to team/app alone")
		}
		if _, err := r.PullCredential(ctx, testRegistryName+"/team/app", [][]byte{dockerConfigJSON(testRegistryName, "puller", "wrong")}); err == nil {
			t.Error("wrong credentials gave a token")
		}
	})

	t.Run("a basic-auth registry gives the credentials themselves", func(t *testing.T) {
		tr := startRegistry(t)
		tr.requireBasicAuth("puller", "s3cret")
		c, err := newTestResolver(t, tr).PullCredential(ctx, testRegistryName+"/team/app", secret)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Basic() || c.Username != "puller" || c.Password != "s3cret" || c.Token != "" {
			t.Errorf("credential %+v; want the basic credentials", c)
		}
	})

	t.Run("an anonymous registry, or no credentials for it, needs nothing", func(t *testing.T) {
		tr := startRegistry(t)
		r := newTestResolver(t, tr)
		for _, secrets := range [][][]byte{secret, nil, {dockerConfigJSON("elsewhere.test", "u", "p")}} {
			c, err := r.PullCredential(ctx, testRegistryName+"/team/app", secrets)
			if err != nil || !c.None() {
				t.Errorf("secrets %q: %+v, %v; want nothing needed", secrets, c, err)
			}
		}
	})

	t.Run("a malformed repository is refused", func(t *testing.T) {
		_, err := newTestResolver(t, startRegistry(t)).PullCredential(ctx, "Registry.test/UPPER", secret)
		if err == nil || !strings.Contains(err.Error(), "repository") {
			t.Errorf("err %v, want one naming the repository", err)
		}
	})
}
