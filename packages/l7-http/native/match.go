// The HTTP rule matcher, as _match.py (Cilium rules.http[]): method, path and
// host are RE2 regexes (Go's regexp is RE2) matched against the whole value;
// headers and headerMatches as implemented there; the first matching rule decides.
package main

import (
	"regexp"
	"strings"
	"sync"
	"unicode/utf8"
)

// What the agent sends for one connection's policy (compiled once per answer).
type policyMsg struct {
	Q     int64     `json:"q"`
	Gen   int64     `json:"gen"`
	Pid   int64     `json:"pid"`
	Deny  bool      `json:"deny"` // policy_for answered None: every request is refused
	Rules []ruleMsg `json:"rules"`
}

type ruleMsg struct {
	Never   bool     `json:"never,omitempty"` // not an HTTP rule: matches nothing
	Method  string   `json:"method,omitempty"`
	Path    string   `json:"path,omitempty"`
	Host    string   `json:"host,omitempty"`
	Headers []string `json:"headers,omitempty"`
	HM      []hmMsg  `json:"hm,omitempty"`
}

type hmMsg struct {
	Name     string  `json:"name"`
	Value    *string `json:"value"`
	Mismatch string  `json:"mismatch"`
}

type pattern struct {
	re  *regexp.Regexp
	bad bool // RE2 refused it: matches nothing (it can only deny)
}

type action struct {
	op, name, value string // name and value as latin-1 bytes when ok
	lname           string
	ok              bool // encodable in latin-1 (else the Python proxy fails the connection)
}

type rule struct {
	never              bool
	method, path, host *pattern
	headers            []string
	hms                []hmMsg
}

type policy struct {
	pid   int64
	deny  bool
	rules []*rule
}

var (
	reMu    sync.Mutex
	reCache = map[string]*pattern{}
)

func compilePattern(p string) *pattern {
	if p == "" {
		return nil
	}
	reMu.Lock()
	defer reMu.Unlock()
	if c, ok := reCache[p]; ok {
		return c
	}
	re, err := regexp.Compile(`^(?:` + p + `)$`)
	c := &pattern{re: re, bad: err != nil}
	if len(reCache) > 4096 {
		reCache = map[string]*pattern{}
	}
	reCache[p] = c
	return c
}

func compilePolicy(m *policyMsg) *policy {
	pol := &policy{pid: m.Pid, deny: m.Deny}
	for _, r := range m.Rules {
		pol.rules = append(pol.rules, &rule{never: r.Never, method: compilePattern(r.Method),
			path: compilePattern(r.Path), host: compilePattern(r.Host), headers: r.Headers, hms: r.HM})
	}
	return pol
}

func full(p *pattern, value string) bool {
	if p == nil {
		return true
	}
	if p.bad {
		return false
	}
	return p.re.MatchString(value)
}

var dotI = strings.NewReplacer("\u0130", "i\u0307")

// lowerName: Python's str.lower() for the names compared here.
func lowerName(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return strings.ToLower(dotI.Replace(s))
		}
	}
	return lowerASCII(s)
}

// latin1: a raw header value as the Python proxy's str (latin-1 decoded), in UTF-8.
func latin1(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			b := make([]rune, len(s))
			for j := 0; j < len(s); j++ {
				b[j] = rune(s[j])
			}
			return string(b)
		}
	}
	return s
}

// toLatin1: a policy string as the bytes Python's .encode("latin-1") gives (ok false: it raises).
func toLatin1(s string) (string, bool) {
	b := make([]byte, 0, len(s))
	for _, r := range s {
		if r > 0xff || r == utf8.RuneError {
			return "", false
		}
		b = append(b, byte(r))
	}
	return string(b), true
}

func values(hs []header, name string) []string {
	ln := lowerName(name)
	var out []string
	for _, h := range hs {
		if lowerASCII(h.name) == ln {
			out = append(out, latin1(h.value))
		}
	}
	return out
}

func present(hs []header, name string) bool {
	ln := lowerName(name)
	for _, h := range hs {
		if lowerASCII(h.name) == ln {
			return true
		}
	}
	return false
}

func headerPresent(spec string, hs []header) bool {
	i := strings.IndexByte(spec, ':')
	if i < 0 {
		return present(hs, trimOWSs(spec))
	}
	return contains(values(hs, trimOWSs(spec[:i])), trimOWSs(spec[i+1:]))
}

func newAction(op, name, value string) action {
	n, ok1 := toLatin1(name)
	v, ok2 := toLatin1(value)
	return action{op: op, name: n, value: v, lname: lowerName(name), ok: ok1 && ok2}
}

func ruleMatches(r *rule, req *requestHead) (bool, []action) {
	if r.never {
		return false, nil
	}
	if !full(r.method, req.method) || !full(r.path, req.path) || !full(r.host, req.host) {
		return false, nil
	}
	for _, spec := range r.headers {
		if !headerPresent(spec, req.headers) {
			return false, nil
		}
	}
	var actions []action
	for _, hm := range r.hms {
		var ok bool
		if hm.Value == nil {
			ok = present(req.headers, hm.Name)
		} else {
			ok = contains(values(req.headers, hm.Name), *hm.Value)
		}
		if ok {
			continue
		}
		val := ""
		if hm.Value != nil {
			val = *hm.Value
		}
		switch hm.Mismatch {
		case "LOG":
		case "ADD", "REPLACE":
			actions = append(actions, newAction(hm.Mismatch, hm.Name, val))
		case "DELETE":
			actions = append(actions, newAction("DELETE", hm.Name, ""))
		default: // "" (and anything unknown): the rule does not match
			return false, nil
		}
	}
	return true, actions
}

// decide: (allowed, the matching rule's header actions).
func decide(pol *policy, req *requestHead) (bool, []action) {
	if pol == nil || pol.deny {
		return false, nil
	}
	if len(pol.rules) == 0 {
		return true, nil
	}
	for _, r := range pol.rules {
		if ok, acts := ruleMatches(r, req); ok {
			return true, acts
		}
	}
	return false, nil
}

// applyActions: the forwarded headers after ADD/DELETE/REPLACE (false: not latin-1).
func applyActions(hs []header, acts []action) ([]header, bool) {
	out := append([]header(nil), hs...)
	for _, a := range acts {
		if !a.ok {
			return nil, false
		}
		if a.op == "DELETE" || a.op == "REPLACE" {
			kept := out[:0:0]
			for _, h := range out {
				if lowerName(latin1(h.name)) != a.lname {
					kept = append(kept, h)
				}
			}
			out = kept
		}
		if a.op == "ADD" || a.op == "REPLACE" {
			out = append(out, header{a.name, a.value})
		}
	}
	return out, true
}
