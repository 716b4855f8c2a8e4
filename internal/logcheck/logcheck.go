// Package logcheck records what a component logs, for tests that its records keep the
// project's conventions: keys in snake_case, an error always under the key "error".
package logcheck

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
)

// Recorder is a slog.Handler that keeps every record logged through it.
type Recorder struct {
	mu      sync.Mutex
	records []slog.Record
}

var _ slog.Handler = (*Recorder)(nil)

// Enabled implements slog.Handler: every level is recorded.
func (r *Recorder) Enabled(context.Context, slog.Level) bool { return true }

// Handle implements slog.Handler.
func (r *Recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, rec.Clone())
	return nil
}

// WithAttrs implements slog.Handler; the attributes are not kept.
func (r *Recorder) WithAttrs([]slog.Attr) slog.Handler { return r }

// WithGroup implements slog.Handler; the group is not kept.
func (r *Recorder) WithGroup(string) slog.Handler { return r }

// Records returns a copy of the records so far.
func (r *Recorder) Records() []slog.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]slog.Record(nil), r.records...)
}

var snakeCase = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// Check returns what breaks the conventions in the records so far, one message each, and how
// many records carried an error. extra, if not nil, is asked about every attribute too and
// returns a message for one it refuses.
func (r *Recorder) Check(extra func(slog.Attr) string) (problems []string, withError int) {
	for _, rec := range r.Records() {
		rec.Attrs(func(a slog.Attr) bool {
			if !snakeCase.MatchString(a.Key) {
				problems = append(problems, fmt.Sprintf("%q: key %q is not snake_case", rec.Message, a.Key))
			}
			if _, isErr := a.Value.Any().(error); isErr {
				if a.Key != "error" {
					problems = append(problems, fmt.Sprintf("%q: an error under the key %q, want \"error\"", rec.Message, a.Key))
				}
				withError++
			}
			if extra != nil {
				if msg := extra(a); msg != "" {
					problems = append(problems, fmt.Sprintf("%q: %s", rec.Message, msg))
				}
			}
			return true
		})
	}
	return problems, withError
}
