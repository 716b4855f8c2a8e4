package main

import (
	"slices"
	"testing"
	"time"
)

// TestRecordProgress: each whole second gets the bytes that had arrived by its end, including
// seconds in which nothing arrived, and the last entry is the total at the end.
func TestRecordProgress(t *testing.T) {
	var p []int64
	p = recordProgress(p, 500*time.Millisecond, 0) // first read: 100 bytes at 0.5 s
	p = recordProgress(p, 2500*time.Millisecond, 100)
	p = recordProgress(p, 2600*time.Millisecond, 200) // same second: nothing new
	p = append(recordProgress(p, 3200*time.Millisecond, 300), 300)
	if want := []int64{100, 100, 300, 300}; !slices.Equal(p, want) {
		t.Errorf("progress = %v, want %v", p, want)
	}
}
