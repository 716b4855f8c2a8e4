package logcheck

import (
	"errors"
	"log/slog"
	"testing"
)

func TestCheck(t *testing.T) {
	r := &Recorder{}
	log := slog.New(r)
	log.Info("fine", "blob_bytes", 3, "error", errors.New("x"))
	log.Info("camel", "blobBytes", 3)
	log.Warn("err key", "err", errors.New("y"))
	log.Info("refused by extra", "kind", 7)
	problems, withError := r.Check(func(a slog.Attr) string {
		if a.Key == "kind" {
			return "kind is a number"
		}
		return ""
	})
	want := []string{
		`"camel": key "blobBytes" is not snake_case`,
		`"err key": an error under the key "err", want "error"`,
		`"refused by extra": kind is a number`,
	}
	if len(problems) != len(want) {
		t.Fatalf("problems = %q, want %q", problems, want)
	}
	for i := range want {
		if problems[i] != want[i] {
			t.Errorf("problem %d = %q, want %q", i, problems[i], want[i])
		}
	}
	if withError != 2 {
		t.Errorf("withError = %d, want 2", withError)
	}
}
