package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

// controllerUser is the API server user the controller runs as: its requests, and only its,
// are written to the audit log.
const controllerUser = "shoal-controller"

// auditPolicy logs every request of controllerUser once, when it completes, without bodies.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
  users: ["` + controllerUser + `"]
- level: None
`

// writeVerbs are the verbs that change objects.
var writeVerbs = map[string]bool{"create": true, "update": true, "patch": true, "delete": true, "deletecollection": true}

// auditEvent is the part of an audit.k8s.io/v1 Event that is counted.
type auditEvent struct {
	Stage string `json:"stage"`
	Verb  string `json:"verb"`
	User  struct {
		Username string `json:"username"`
	} `json:"user"`
	ObjectRef *struct {
		Resource    string `json:"resource"`
		Subresource string `json:"subresource"`
	} `json:"objectRef"`
	ResponseStatus *struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
}

// requests counts the controller's API requests.
type requests struct {
	// Writes are by "verb resource", e.g. "create swarmseeds".
	Writes map[string]int `json:"writes"`
	// Refused are writes answered with a status of 300 or more (conflicts, AlreadyExists,
	// Forbidden), also by "verb resource"; they are in Writes too.
	Refused map[string]int `json:"refused,omitempty"`
	// Reads are the other requests by verb (get, list, watch).
	Reads map[string]int `json:"reads"`
}

func (r requests) writes() int {
	n := 0
	for _, c := range r.Writes {
		n += c
	}
	return n
}

func (r requests) writesOf(resource string) int {
	n := 0
	for key, c := range r.Writes {
		if _, res, _ := strings.Cut(key, " "); res == resource {
			n += c
		}
	}
	return n
}

// auditSize is the audit log's size now: where the next events will start.
func auditSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("audit log: %w", err)
	}
	return fi.Size(), nil
}

// readAudit counts controllerUser's requests in the audit log from offset from to offset to
// (the file's end when to < 0).
func readAudit(path string, from, to int64) (requests, error) {
	f, err := os.Open(path)
	if err != nil {
		return requests{}, fmt.Errorf("audit log: %w", err)
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return requests{}, fmt.Errorf("audit log: %w", err)
	}
	var r io.Reader = f
	if to >= 0 {
		r = io.LimitReader(f, to-from)
	}
	return countRequests(r)
}

func countRequests(r io.Reader) (requests, error) {
	out := requests{Writes: map[string]int{}, Refused: map[string]int{}, Reads: map[string]int{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var ev auditEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return out, fmt.Errorf("audit log line %.80q: %w", sc.Text(), err)
		}
		if ev.Stage != "ResponseComplete" || ev.User.Username != controllerUser {
			continue
		}
		if !writeVerbs[ev.Verb] {
			out.Reads[ev.Verb]++
			continue
		}
		key := ev.Verb
		if ev.ObjectRef != nil {
			key += " " + ev.ObjectRef.Resource
			if ev.ObjectRef.Subresource != "" {
				key += "/" + ev.ObjectRef.Subresource
			}
		}
		out.Writes[key]++
		if ev.ResponseStatus != nil && ev.ResponseStatus.Code >= 300 {
			out.Refused[key]++
		}
	}
	return out, sc.Err()
}
