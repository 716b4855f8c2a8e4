// A stand-in for github.com/anacrolix/go-utp, which Shoal's go.mod puts in place of the real
// module with a replace directive. anacrolix/torrent v1.62.0 imports go-utp and requires
// v0.0.0-20260908033909-9f1664acf866, and the Go module proxy refuses that version's source
// (403, "This module version is not available") and lists no other. Shoal never uses uTP, so
// these constructors fail and only the API the torrent client compiles against is here.
// Delete this directory and the replace once the proxy serves the real module.
module github.com/anacrolix/go-utp

go 1.24
