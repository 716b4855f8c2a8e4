package resolve

import (
	"container/list"
	"time"
)

// lru is a cache of results bounded by its number of entries, least recently used evicted
// first. Entries may expire (tags); those that do not (digests) stay until evicted. It is not
// safe for concurrent use: the Resolver's mutex guards it.
type lru struct {
	max     int
	order   *list.List // of *cacheEntry, most recently used first
	entries map[string]*list.Element
}

type cacheEntry struct {
	key     string
	result  *Result
	expires time.Time // zero: never
}

func newLRU(maxEntries int) *lru {
	return &lru{max: maxEntries, order: list.New(), entries: map[string]*list.Element{}}
}

// get returns the result under key if it has not expired at now.
func (c *lru) get(key string, now time.Time) (*Result, bool) {
	el, ok := c.entries[key]
	if !ok {
		return nil, false
	}
	e, _ := el.Value.(*cacheEntry) // only *cacheEntry values are stored
	if !e.expires.IsZero() && !now.Before(e.expires) {
		c.order.Remove(el)
		delete(c.entries, key)
		return nil, false
	}
	c.order.MoveToFront(el)
	return e.result, true
}

// add stores result under key until expires (zero: for good), evicting the least recently used
// entry when full.
func (c *lru) add(key string, result *Result, expires time.Time) {
	if c.max <= 0 {
		return
	}
	if el, ok := c.entries[key]; ok {
		el.Value = &cacheEntry{key: key, result: result, expires: expires}
		c.order.MoveToFront(el)
		return
	}
	c.entries[key] = c.order.PushFront(&cacheEntry{key: key, result: result, expires: expires})
	for c.order.Len() > c.max {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		e, _ := oldest.Value.(*cacheEntry) // only *cacheEntry values are stored
		delete(c.entries, e.key)
	}
}

func (c *lru) len() int { return c.order.Len() }
