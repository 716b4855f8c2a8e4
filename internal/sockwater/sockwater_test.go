package sockwater

import (
	"net"
	"testing"
)

// TestNextEndsBodiesWithTheMarkDown walks bodies of several lengths with reads of several sizes
// as a reader would: a read under the raised mark never takes a body's last bytes, so the read
// that ends it (and may hand its connection back to a pool) always runs with the mark at 1.
func TestNextEndsBodiesWithTheMarkDown(t *testing.T) {
	for _, length := range []int64{1, Default, 2 * Default, 2*Default + 1, 1 << 20, 5<<20 + 17} {
		for _, n := range []int{1 << 10, Default, 256 << 10, 4 << 20} {
			raised := false
			for rem := length; rem > 0; {
				mark, limit := Next(rem, n)
				if limit < 1 || limit > n {
					t.Fatalf("length %d, reads of %d: Next(%d) lets a read take %d bytes", length, n, rem, limit)
				}
				if mark > 1 {
					raised = true
					if int64(mark) > rem {
						t.Fatalf("length %d: a mark of %d with %d bytes left", length, mark, rem)
					}
				}
				got := min(int64(limit), rem) // the read takes all it may
				if got == rem && mark != 1 {
					t.Fatalf("length %d, reads of %d: the read that ends the body runs with the mark at %d", length, n, mark)
				}
				rem -= got
			}
			if length > 2*Default && n > 2*Default && !raised {
				t.Errorf("length %d, reads of %d: the mark was never raised", length, n)
			}
		}
	}
}

// wrapped is a connection that says which one it runs on, as a TLS one does.
type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

// hidden is a connection that does not.
type hidden struct{ net.Conn }

// The socket is found under connections that say which one they run on, and not under others.
func TestSocketIsFoundUnderWrappedConnections(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if Socket(wrapped{wrapped{c}}) == nil {
		t.Error("no socket under a connection wrapped twice")
	}
	if Socket(hidden{c}) != nil {
		t.Error("a socket under a connection that hides it")
	}
}
