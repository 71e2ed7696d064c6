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

var (
	originRe = regexp.MustCompile(`^(/[` + pchars + `/]*)(\?[` + pchars + `/?]*)?$`)
	// Python's \s (str patterns) also takes \v and \x1c-\x1f
	absoluteRe = regexp.MustCompile(`^[hH][tT][tT][pP]://([^/?#@\t\n\v\f\r \x1c-\x1f]+)(/[` + pchars + `/]*)?(\?[` + pchars + `/?]*)?$`)
	hostRe     = regexp.MustCompile(`^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?$`)
)

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

// parse_target: (path to match and forward, authority, absolute-form?)
func parseTarget(target string) (string, string, bool, *httpError) {
	if strings.HasPrefix(target, "/") {
		m := originRe.FindStringSubmatch(target)
		if m == nil {
			return "", "", false, herr(400, "invalid request-target")
		}
		p, e := normalizePath(m[1])
		if e != nil {
			return "", "", false, e
		}
		if m[2] != "" && badPct(m[2]) {
			return "", "", false, herr(400, "malformed percent-encoding in query")
		}
		return p + m[2], "", false, nil
	}
	m := absoluteRe.FindStringSubmatch(target)
	if m == nil {
		return "", "", false, herr(400, "request-target is neither origin-form nor absolute-form")
	}
	authority, path, query := m[1], m[2], m[3]
	if path == "" {
		path = "/"
	}
	if !hostRe.MatchString(authority) {
		return "", "", false, herr(400, "invalid authority in request-target")
	}
	p, e := normalizePath(path)
	if e != nil {
		return "", "", false, e
	}
	if query != "" && badPct(query) {
		return "", "", false, herr(400, "malformed percent-encoding in query")
	}
	return p + query, authority, true, nil
}
