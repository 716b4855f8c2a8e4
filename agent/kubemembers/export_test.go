package kubemembers

import "time"

// SetRetry sets the first and the longest wait between announcement attempts.
func (s *Source) SetRetry(first, longest time.Duration) { s.retry, s.maxRetry = first, longest }

// OnAnnounced sets a function called with the result of every announcement attempt.
func (s *Source) OnAnnounced(f func(error)) { s.announced = f }
