package controllers

import (
	"math/rand/v2"
	"sync"
	"time"
)

// Bounds of the controller's retries of registry work that failed: a Prewarm's reference, a
// pull-token exchange, a pending pod's image.
const (
	// retryBase is the delay after a first failure: soon enough for a passing error not to
	// hold a pod's seeding up for long.
	retryBase = 5 * time.Second
	// retryMax caps the delay: a registry that stays down or a secret that stays wrong is
	// asked about about once every 2.5 to 5 minutes per key.
	retryMax = 5 * time.Minute
	// retryKeys bounds how many keys a backoff remembers.
	retryKeys = 4096
)

// backoff spaces out the retries of keys that keep failing: after n consecutive failures
// the next try waits a random delay in [d/2, d], d = min(max, base·2^(n-1)), so that the
// Prewarms or pods that failed together (a registry outage) do not come back together.
// A success forgets the key. A key whose retry has been due for longer than max is no longer
// being retried (its Prewarm or image has gone) and is forgotten; beyond maxKeys the key
// least recently failed is forgotten too. Forgetting costs an early retry, never a missed
// one. Time is passed in and randomness injected, so that tests decide both. It is safe for
// concurrent use.
type backoff struct {
	base, max time.Duration
	maxKeys   int
	// rand returns a number in [0, 1).
	rand func() float64

	mu        sync.Mutex
	keys      map[string]retryState
	lastSweep time.Time
}

// retryState is a key's run of failures.
type retryState struct {
	failures int
	failedAt time.Time
	retryAt  time.Time
}

// newBackoff returns a backoff from retryBase to retryMax remembering at most maxKeys keys;
// rnd returns numbers in [0, 1) (nil: math/rand/v2).
func newBackoff(maxKeys int, rnd func() float64) *backoff {
	if rnd == nil {
		rnd = rand.Float64
	}
	return &backoff{base: retryBase, max: retryMax, maxKeys: maxKeys, rand: rnd, keys: map[string]retryState{}}
}

// wait is how long key must still wait at now before its next try; 0 when it may go now
// (no failure remembered, or its retry is due).
func (b *backoff) wait(key string, now time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	st, ok := b.keys[key]
	if !ok || !now.Before(st.retryAt) {
		return 0
	}
	return st.retryAt.Sub(now)
}

// failed records that key failed at now and returns how long to wait before trying it again.
func (b *backoff) failed(key string, now time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sweep(now)
	st, ok := b.keys[key]
	if !ok && len(b.keys) >= b.maxKeys {
		b.evictOldest()
	}
	st.failures++
	d := b.max
	// base·2^(n-1), checked before the shift can overflow or pass max.
	if n := st.failures - 1; n < 62 && b.base <= b.max>>n {
		d = b.base << n
	}
	delay := d/2 + time.Duration(b.rand()*float64(d-d/2))
	st.failedAt, st.retryAt = now, now.Add(delay)
	b.keys[key] = st
	return delay
}

// succeeded forgets key: its next failure waits base again.
func (b *backoff) succeeded(key string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.keys, key)
}

// size is how many keys are remembered.
func (b *backoff) size() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.keys)
}

// sweep forgets, at most once per max, the keys whose retry has been due for longer than max.
func (b *backoff) sweep(now time.Time) {
	if now.Sub(b.lastSweep) < b.max {
		return
	}
	b.lastSweep = now
	for k, st := range b.keys {
		if now.Sub(st.retryAt) > b.max {
			delete(b.keys, k)
		}
	}
}

// evictOldest forgets the key that failed longest ago.
func (b *backoff) evictOldest() {
	var oldest string
	var at time.Time
	found := false
	for k, st := range b.keys {
		if !found || st.failedAt.Before(at) {
			oldest, at, found = k, st.failedAt, true
		}
	}
	if found {
		delete(b.keys, oldest)
	}
}
