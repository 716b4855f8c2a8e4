package plan

import (
	"encoding/json"
	"net/netip"
	"net/url"
	"strconv"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func testRequest(t *testing.T) Request {
	t.Helper()
	d := v1.Hash{Algorithm: "sha256", Hex: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
	p, err := New(d, 256<<20, 16<<20, 1<<20, 4, 16)
	if err != nil {
		t.Fatal(err)
	}
	return Request{Plan: p, Segment: 3, Registry: "registry.test:5000", Repository: "library/app",
		Peer: netip.MustParseAddrPort("[fd00::1]:7070")}
}

// TestRequestQueryGolden pins the query of a segment request, which agents of adjacent releases
// must read alike: parameter names and encodings, min_segments absent when 0 (as agents of the
// previous release send it), whole and reseed absent unless set.
func TestRequestQueryGolden(t *testing.T) {
	const common = "digest=sha256%3A2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
	r := testRequest(t)
	v1Style := r
	v1Style.Plan.MinSegments = 0
	flagged := r
	flagged.Whole, flagged.Reseed = true, true
	for _, tt := range []struct {
		name string
		r    Request
		want string
	}{
		{"protocol 2", r, common + "&min_segments=16&peer=%5Bfd00%3A%3A1%5D%3A7070&piece_length=1048576&ramp=4" +
			"&registry=registry.test%3A5000&repository=library%2Fapp&segment=3&segment_size=16777216&size=268435456"},
		{"no minimum", v1Style, common + "&peer=%5Bfd00%3A%3A1%5D%3A7070&piece_length=1048576&ramp=4" +
			"&registry=registry.test%3A5000&repository=library%2Fapp&segment=3&segment_size=16777216&size=268435456"},
		{"whole and reseed", flagged, common + "&min_segments=16&peer=%5Bfd00%3A%3A1%5D%3A7070&piece_length=1048576&ramp=4" +
			"&registry=registry.test%3A5000&repository=library%2Fapp&reseed=1&segment=3&segment_size=16777216&size=268435456&whole=1"},
	} {
		if got := tt.r.Query().Encode(); got != tt.want {
			t.Errorf("%s:\n got %s\nwant %s", tt.name, got, tt.want)
		}
	}
}

// TestRequestRoundTrip: what Query encodes, ParseRequest decodes to the same request.
func TestRequestRoundTrip(t *testing.T) {
	r := testRequest(t)
	noMinimum := r
	noMinimum.Plan.MinSegments = 0
	whole := r
	whole.Whole, whole.Segment = true, 0
	reseed := r
	reseed.Reseed, reseed.Peer, reseed.Segment = true, netip.MustParseAddrPort("10.0.0.1:7000"), r.Plan.Segments()-1
	for _, want := range []Request{r, noMinimum, whole, reseed} {
		got, err := ParseRequest(want.Query())
		if err != nil {
			t.Fatalf("%v: %v", want.Query().Encode(), err)
		}
		if got != want {
			t.Errorf("round trip of %+v gave %+v", want, got)
		}
	}
}

// TestParseRequestRefuses: every parameter is checked; a request that names no segment of a
// valid plan, no valid place upstream or no valid peer is refused.
func TestParseRequestRefuses(t *testing.T) {
	good := testRequest(t).Query()
	if _, err := ParseRequest(good); err != nil {
		t.Fatalf("test setup: the good request is refused: %v", err)
	}
	for _, tt := range []struct{ name, value string }{
		{"digest", "sha256:zz"},
		{"digest", ""},
		{"segment", "-1"},
		{"segment", strconv.Itoa(testRequest(t).Plan.Segments())},
		{"segment", "x"},
		{"size", "0"},
		{"size", "x"},
		{"segment_size", ""},
		{"piece_length", "3"},
		{"ramp", ""},
		{"ramp", "65"},
		{"min_segments", "x"},
		{"registry", ""},
		{"repository", "UP"},
		{"peer", "1.2.3.4"},
		{"whole", "2"},
		{"reseed", "yes"},
	} {
		q := url.Values{}
		for k, v := range good {
			q[k] = v
		}
		q.Set(tt.name, tt.value)
		if r, err := ParseRequest(q); err == nil {
			t.Errorf("%s=%q accepted: %+v", tt.name, tt.value, r)
		}
	}
}

// TestAnswerJSONGolden pins the answer's JSON field names, which agents of adjacent releases
// must read alike.
func TestAnswerJSONGolden(t *testing.T) {
	for _, tt := range []struct {
		a    Answer
		want string
	}{
		{Answer{Info: []byte{1, 2, 0xff}, Peers: []string{"10.0.0.1:7070"}}, `{"info":"AQL/","peers":["10.0.0.1:7070"]}`},
		{Answer{Error: "upstream ignores Range", Code: CodeRangeUnsupported}, `{"error":"upstream ignores Range","code":"range_unsupported"}`},
	} {
		got, err := json.Marshal(tt.a)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != tt.want {
			t.Errorf("got %s, want %s", got, tt.want)
		}
	}
}

// FuzzParseRequest feeds the control protocol's parser arbitrary blob geometry: it must never
// panic, and a plan it accepts must tile the blob.
func FuzzParseRequest(f *testing.F) {
	f.Add(int64(256<<20), int64(16<<20), int64(1<<20), 4, 16, 3)
	f.Add(int64(1), int64(16<<20), int64(1<<20), 0, 0, 0)
	f.Add(int64(64<<20+1), int64(16<<20), int64(1<<20), 4, 16, 18)
	f.Add(int64(1<<40), int64(16<<20), int64(16<<10), 64, 1024, 100)
	f.Fuzz(func(t *testing.T, size, segmentSize, pieceLength int64, ramp, minSegments, k int) {
		q := url.Values{
			"digest":       {"sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
			"segment":      {strconv.Itoa(k)},
			"size":         {strconv.FormatInt(size, 10)},
			"segment_size": {strconv.FormatInt(segmentSize, 10)},
			"piece_length": {strconv.FormatInt(pieceLength, 10)},
			"ramp":         {strconv.Itoa(ramp)},
			"min_segments": {strconv.Itoa(minSegments)},
			"registry":     {"registry.test"},
			"repository":   {"app"},
			"peer":         {"127.0.0.1:7000"},
		}
		r, err := ParseRequest(q)
		if err != nil {
			return
		}
		if r.Segment < 0 || r.Segment >= r.Plan.Segments() {
			t.Fatalf("accepted segment %d of %d", r.Segment, r.Plan.Segments())
		}
		if r.Plan.Segments() <= 1<<16 {
			checkCovers(t, r.Plan)
		}
	})
}
