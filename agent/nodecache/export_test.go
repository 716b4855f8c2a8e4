package nodecache

import "time"

// SetRetry sets the first and the longest wait before an item that failed is tried again.
func (w *Worker) SetRetry(first, longest time.Duration) { w.retry, w.maxRetry = first, longest }

// SetWriteRetry sets the first and the longest wait before a status write that failed is tried
// again.
func (w *Worker) SetWriteRetry(first, longest time.Duration) {
	w.writeRetry, w.maxWriteRetry = first, longest
}
