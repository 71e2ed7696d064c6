// The request-target as _target.py reads it: origin- or absolute-form, the
// path normalised as Envoy's normalize_path (rule 4 of _wire.py's docstring).
package main

import (
	"regexp"
	"strings"
	"unicode/utf8"
)

// -- the request-target (_target.py) ---------------------------------------------

const pchars = `A-Za-z0-9\-._~!$&'()*+,;=:@%`

// originForm: ^(/[pchars/]*)(\?[pchars/?]*)?$ by hand (as a regexp it was a
// fifth of a request head's parsing): the path up to the first "?", the query from it.
func originForm(target string) (path, query string, ok bool) {
	i := strings.IndexByte(target, '?')
	if i < 0 {
		i = len(target)
	}
	path, query = target[:i], target[i:]
	if len(path) == 0 || path[0] != '/' {
		return "", "", false
	}
	for j := 1; j < len(path); j++ {
		if !pchar[path[j]] && path[j] != '/' {
			return "", "", false
		}
	}
	for j := 1; j < len(query); j++ {
		if !pchar[query[j]] && query[j] != '/' && query[j] != '?' {
			return "", "", false
		}
	}
	return path, query, true
}

// isHost, by hand (as originForm): ^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?$
// (neither class holds the character that ends it: no backtracking to mirror).
func isHost(s string) bool {
	i := 0
	if len(s) > 0 && s[0] == '[' {
		i = 1
		for i < len(s) && (isHex(s[i]) || s[i] == ':' || s[i] == '.') {
			i++
		}
		if i == 1 || i == len(s) || s[i] != ']' {
			return false
		}
		i++
	} else {
		for i < len(s) && regName[s[i]] {
			i++
		}
	}
	if i == len(s) {
		return true
	}
	if s[i] != ':' {
		return false
	}
	for i++; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

var pchar, regName [256]bool

func init() {
	const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	for _, c := range []byte(alnum + "-._~!$&'()*+,;=:@%") {
		pchar[c] = true
	}
	for _, c := range []byte(alnum + "-._~!$&'()*+,;=%") {
		regName[c] = true
	}
}

// Python's \s (str patterns) also takes \v and \x1c-\x1f
var absoluteRe = regexp.MustCompile(`^[hH][tT][tT][pP]://([^/?#@\t\n\v\f\r \x1c-\x1f]+)(/[` + pchars + `/]*)?(\?[` + pchars + `/?]*)?$`)

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// _PCT.search: a "%" not followed by two hex digits
func badPct(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && (i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2])) {
			return true
		}
	}
	return false
}

func isUnreserved(c byte) bool {
	return c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' ||
		c == '.' || c == '_' || c == '~'
}

func removeDotSegments(path string) string {
	segs := strings.Split(path, "/")[1:]
	out := make([]string, 0, len(segs))
	for i, seg := range segs {
		last := i == len(segs)-1
		switch seg {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, seg)
		}
	}
	return "/" + strings.Join(out, "/")
}

func normalizePath(path string) (string, *httpError) {
	if !strings.Contains(path, "%") && !strings.Contains(path, "/.") {
		return path, nil // ASCII already (the target was checked)
	}
	if badPct(path) {
		return "", herr(400, "malformed percent-encoding in path")
	}
	var norm strings.Builder
	for i := 0; i < len(path); i++ {
		if path[i] != '%' {
			norm.WriteByte(path[i])
			continue
		}
		o := unhex(path[i+1])<<4 | unhex(path[i+2])
		if o < 0x20 || o == 0x7f || o == '/' || o == '\\' {
			return "", herr(400, "encoded '/', '\\' or control character in path")
		}
		if isUnreserved(o) {
			norm.WriteByte(o)
		} else {
			norm.WriteString("%" + strings.ToUpper(path[i+1:i+3]))
		}
		i += 2
	}
	n := norm.String()
	raw := make([]byte, 0, len(n))
	for i := 0; i < len(n); i++ {
		if n[i] == '%' {
			raw = append(raw, unhex(n[i+1])<<4|unhex(n[i+2]))
			i += 2
		} else {
			raw = append(raw, n[i])
		}
	}
	if !utf8.Valid(raw) {
		return "", herr(400, "invalid or overlong UTF-8 in path")
	}
	for _, seg := range strings.Split(string(raw), "/") {
		if strings.HasPrefix(seg, ".;") || strings.HasPrefix(seg, "..;") {
			return "", herr(400, "dot-segment with path parameters ('..;') in path")
		}
	}
	return removeDotSegments(n), nil
}

// pathQuery: the normalized path and its query, both checked
func pathQuery(path, query string) (string, *httpError) {
	p, e := normalizePath(path)
	if e != nil {
		return "", e
	}
	if query != "" && badPct(query) {
		return "", herr(400, "malformed percent-encoding in query")
	}
	return p + query, nil
}

// parse_target: (path to match and forward, authority, absolute-form?)
func parseTarget(target string) (string, string, bool, *httpError) {
	if strings.HasPrefix(target, "/") {
		path, query, ok := originForm(target)
		if !ok {
			return "", "", false, herr(400, "invalid request-target")
		}
		pq, e := pathQuery(path, query)
		return pq, "", false, e
	}
	m := absoluteRe.FindStringSubmatch(target)
	if m == nil {
		return "", "", false, herr(400, "request-target is neither origin-form nor absolute-form")
	}
	authority, path, query := m[1], m[2], m[3]
	if path == "" {
		path = "/"
	}
	if !isHost(authority) {
		return "", "", false, herr(400, "invalid authority in request-target")
	}
	pq, e := pathQuery(path, query)
	if e != nil {
		return "", "", false, e
	}
	return pq, authority, true, nil
}
