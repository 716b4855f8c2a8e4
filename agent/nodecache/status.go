package nodecache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// The conditions of a NodeCache.
const (
	ConditionReady    = "Ready"
	ConditionDegraded = "Degraded"
	// ConditionContainerdConfigured is False when the agent's preflight found containerd
	// configured so that Shoal cannot work as it should (Config.ContainerdProblems).
	ConditionContainerdConfigured = "ContainerdConfigured"
)

// maxConflicts bounds the re-reads of one status write that meets a newer object.
const maxConflicts = 5

// status is the status the worker's items call for. Conditions are carried over from prev, so
// that their transition times change only when they do. active reports whether some item is
// not held yet, so that its bytes may move.
func (w *Worker) status(prev *v1alpha1.NodeCacheStatus) (st v1alpha1.NodeCacheStatus, active bool) {
	w.mu.Lock()
	st = v1alpha1.NodeCacheStatus{
		ObservedGeneration: w.generation,
		AgentVersion:       w.cfg.AgentVersion,
		PeerAddress:        w.cfg.PeerAddress,
		Items:              make([]v1alpha1.NodeCacheItemStatus, 0, len(w.order)),
	}
	var held, failed int
	var firstFailure *v1alpha1.NodeCacheItemStatus
	for _, ref := range w.order {
		it := w.byRef[ref]
		is := v1alpha1.NodeCacheItemStatus{
			Reference: ref, State: it.state, Bytes: it.bytes.Load(), TotalBytes: it.total,
			Reason: it.reason, Message: it.message,
		}
		if it.total > 0 {
			is.Bytes = min(max(is.Bytes, 0), it.total)
		}
		if it.state == v1alpha1.ItemReady {
			is.Bytes = it.total
		}
		if it.spec.RuntimeImport {
			is.Runtime = v1alpha1.RuntimeNotImported
			if it.runtime != "" {
				is.Runtime = it.runtime
			}
			if it.state == v1alpha1.ItemReady {
				is.Message = it.runtimeNote
			}
		}
		switch it.state {
		case v1alpha1.ItemReady:
			held++
		case v1alpha1.ItemFailed:
			failed++
			active = true
		default:
			active = true
		}
		st.Items = append(st.Items, is)
		if it.state == v1alpha1.ItemFailed && firstFailure == nil {
			firstFailure = &st.Items[len(st.Items)-1]
		}
	}
	w.mu.Unlock()

	used, _ := w.cfg.Store.Usage()
	st.Store = &v1alpha1.StoreUsage{CapacityBytes: w.cfg.Store.MaxBytes(), UsedBytes: used, PinnedBytes: w.cfg.Store.PinnedBytes()}
	n := len(st.Items)
	st.Ready = fmt.Sprintf("%d/%d", held, n)
	st.Conditions = append([]metav1.Condition(nil), prev.Conditions...)
	set := func(typ string, ok bool, reason, message string) {
		status := metav1.ConditionFalse
		if ok {
			status = metav1.ConditionTrue
		}
		apimeta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: typ, Status: status,
			ObservedGeneration: st.ObservedGeneration, Reason: reason, Message: message})
	}
	if held == n {
		set(ConditionReady, true, "AllItemsHeld", fmt.Sprintf("%d items held as asked", n))
	} else {
		set(ConditionReady, false, "ItemsNotHeld", fmt.Sprintf("%d of %d items held as asked", held, n))
	}
	if p := w.cfg.ContainerdProblems; len(p) > 0 {
		msg := p[0].Message
		if len(p) > 1 {
			msg = fmt.Sprintf("%s (and %d more: see the Node's events)", msg, len(p)-1)
		}
		set(ConditionContainerdConfigured, false, p[0].Reason, msg)
	} else {
		set(ConditionContainerdConfigured, true, "PreflightPassed", "containerd reads Shoal's hosts.toml files and keeps image layers")
	}
	if firstFailure != nil {
		set(ConditionDegraded, true, string(firstFailure.Reason), fmt.Sprintf("%d items failed; %s: %s", failed, firstFailure.Reference, firstFailure.Message))
	} else {
		set(ConditionDegraded, false, "NoFailures", "no item failed")
	}
	return st, active
}

// change is how a status differs from the one written, which decides how soon it is written.
type change int

const (
	noChange       change = iota
	usageChange           // only the store's usage: at most every usageInterval
	progressChange        // bytes, an item starting or starting again: at most every StatusInterval
	urgentChange          // items added or removed, held, failed, a new spec: at once
)

// classify says how next differs from cur.
func classify(cur, next *v1alpha1.NodeCacheStatus) change {
	if equality.Semantic.DeepEqual(cur, next) {
		return noChange
	}
	if cur.ObservedGeneration != next.ObservedGeneration || cur.AgentVersion != next.AgentVersion ||
		cur.PeerAddress != next.PeerAddress || cur.Store == nil || len(cur.Items) != len(next.Items) {
		return urgentChange
	}
	for i := range next.Items {
		a, b := &cur.Items[i], &next.Items[i]
		if a.Reference != b.Reference || a.Runtime != b.Runtime {
			return urgentChange
		}
		settled := b.State == v1alpha1.ItemReady || b.State == v1alpha1.ItemFailed
		if settled && (a.State != b.State || a.Reason != b.Reason || a.Message != b.Message || a.TotalBytes != b.TotalBytes) {
			return urgentChange
		}
	}
	if !equality.Semantic.DeepEqual(cur.Items, next.Items) || cur.Ready != next.Ready ||
		!equality.Semantic.DeepEqual(cur.Conditions, next.Conditions) {
		return progressChange
	}
	return usageChange
}

// writeStatuses writes the status whenever it changed, as soon as its kind of change allows
// (see change), until ctx ends. A failed write is tried again with backoff, or as soon as the
// watch delivers an object, which shows that the API server answers again; the items go on.
func (w *Worker) writeStatuses(ctx context.Context, client rest.Interface) {
	var (
		cur       *v1alpha1.NodeCache // the object as last written or read
		lastWrite = time.Now()        // a restart waits an interval before writing progress
		retryAt   time.Time
		heard     *v1alpha1.NodeCache // what the watch had delivered when a write last failed
		wait      = w.writeRetry
	)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if !retryAt.IsZero() && w.seen() != heard {
			// After an outage the backoff may have grown to maxWriteRetry; the status need
			// not lag that long behind an API server that is back.
			retryAt = time.Time{}
		}
		cur = w.freshest(cur)
		var due time.Time
		now := time.Now()
		if cur != nil {
			next, active := w.status(&cur.Status)
			switch classify(&cur.Status, &next) {
			case urgentChange:
				due = lastWrite.Add(w.minWriteGap)
			case progressChange:
				due = lastWrite.Add(w.cfg.StatusInterval)
			case usageChange:
				due = lastWrite.Add(w.usageInterval)
			}
			if !due.IsZero() && due.Before(retryAt) {
				due = retryAt
			}
			if !due.IsZero() && !due.After(now) {
				written, err := w.write(ctx, client, cur, next)
				if ctx.Err() != nil {
					return
				}
				if err == nil {
					cur, lastWrite, retryAt, wait = written, now, time.Time{}, w.writeRetry
					continue
				}
				retryAt, heard = now.Add(wait/2+rand.N(wait/2+1)), w.seen()
				w.log.Warn("write NodeCache status; retrying", "node", w.cfg.NodeName, "retry_in", retryAt.Sub(now), "error", err)
				wait = min(2*wait, w.maxWriteRetry)
				continue
			}
			if due.IsZero() && active {
				due = now.Add(w.cfg.StatusInterval) // look at the bytes again
			}
		}
		if !due.IsZero() {
			timer.Reset(due.Sub(now))
		}
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// seen returns the object the watch delivered last (nil: none, or there is none).
func (w *Worker) seen() *v1alpha1.NodeCache {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.latest
}

// freshest returns the object to write the status into: cur, or the one the watch saw last
// when that is another object or a newer spec. nil: there is none.
func (w *Worker) freshest(cur *v1alpha1.NodeCache) *v1alpha1.NodeCache {
	latest := w.seen()
	switch {
	case latest == nil:
		return nil
	case cur == nil || cur.UID != latest.UID || latest.Generation > cur.Generation:
		return latest.DeepCopy()
	}
	return cur
}

// write puts st into the status of cur, re-reading the object when another write came first.
func (w *Worker) write(ctx context.Context, client rest.Interface, cur *v1alpha1.NodeCache, st v1alpha1.NodeCacheStatus) (*v1alpha1.NodeCache, error) {
	obj := cur.DeepCopy()
	for conflicts := 0; ; conflicts++ {
		obj.Status = st
		var out v1alpha1.NodeCache
		err := client.Put().Resource("nodecaches").Name(obj.Name).SubResource("status").Body(obj).Do(ctx).Into(&out)
		switch {
		case err == nil:
			w.metrics.writes.WithLabelValues(writeOK).Inc()
			return &out, nil
		case apierrors.IsConflict(err) && conflicts < maxConflicts:
			w.metrics.writes.WithLabelValues(writeConflict).Inc()
			obj = &v1alpha1.NodeCache{}
			if err := client.Get().Resource("nodecaches").Name(cur.Name).Do(ctx).Into(obj); err != nil {
				return nil, fmt.Errorf("read NodeCache %s again after a conflict: %w", cur.Name, err)
			}
			if obj.UID != cur.UID {
				return nil, errors.New("the NodeCache was replaced")
			}
		default:
			w.metrics.writes.WithLabelValues(writeError).Inc()
			return nil, fmt.Errorf("update the status of NodeCache %s: %w", cur.Name, err)
		}
	}
}
