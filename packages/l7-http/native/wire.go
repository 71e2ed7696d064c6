// The request and response heads, as packages/l7-http/src/axoneme/l7/http/_wire.py
// and _target.py read them: the same refusals with the same statuses and
// reasons (the proxy answers them to the client), the same normalisation.
// Byte strings are raw (latin-1) throughout; only ASCII is ever interpreted.
package main

import (
	"bytes"
	"strconv"
	"strings"
)

const (
	maxRequestLine     = 8 * 1024
	maxHeadBytes       = 64 * 1024
	maxHeaders         = 100
	maxChunkLine       = 4 * 1024
	maxChunkSizeDigits = 15
	maxDrain           = 64 * 1024
	streamLimit        = maxRequestLine + maxHeadBytes + 4 // asyncio's stream limit in _proxy.py
)

type httpError struct {
	status int
	reason string
}

func (e *httpError) Error() string { return strconv.Itoa(e.status) + " " + e.reason }

func herr(status int, reason string) *httpError { return &httpError{status, reason} }

var methods = map[string]bool{}

func init() {
	for _, m := range strings.Fields("GET HEAD POST PUT DELETE OPTIONS TRACE PATCH QUERY ACL BIND " +
		"CHECKOUT COPY LINK LOCK MERGE MKACTIVITY MKCALENDAR MKCOL MOVE PROPFIND PROPPATCH REBIND " +
		"REPORT SEARCH UNBIND UNLINK UNLOCK M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE SOURCE CONNECT") {
		methods[m] = true
	}
}

var tokenChar [256]bool

func init() {
	for c := '0'; c <= '9'; c++ {
		tokenChar[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		tokenChar[c] = true
		tokenChar[c-32] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		tokenChar[c] = true
	}
}

func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if !tokenChar[c] {
			return false
		}
	}
	return true
}

// _VALUE: [\t\x20-\x7e\x80-\xff]*
func isValue(b []byte) bool {
	for _, c := range b {
		if c < 0x20 && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

func trimOWS(b []byte) []byte {
	i, j := 0, len(b)
	for i < j && (b[i] == ' ' || b[i] == '\t') {
		i++
	}
	for j > i && (b[j-1] == ' ' || b[j-1] == '\t') {
		j--
	}
	return b[i:j]
}

func trimOWSs(s string) string { return string(trimOWS([]byte(s))) }

type header struct{ name, value string } // raw bytes (latin-1), value OWS-trimmed

type requestHead struct {
	method, target, path, version string
	headers                       []header
	host                          string
	contentLength                 int64 // -1: none
	chunked, keepAlive, expect    bool
	upgrade, absolute, stripUpg   bool
	raw                           []byte
}

func (r *requestHead) hasBody() bool { return r.chunked || r.contentLength > 0 }

// serialize: the validated bytes as received when nothing changes, else rebuilt.
func (r *requestHead) serialize(hs []header, changed bool) []byte {
	if !changed && r.raw != nil && !r.absolute && r.path == r.target {
		return r.raw
	}
	if !changed {
		hs = r.headers
	}
	var b bytes.Buffer
	b.WriteString(r.method + " " + r.path + " " + r.version)
	for _, h := range hs {
		b.WriteString("\r\n" + h.name + ": " + h.value)
	}
	b.WriteString("\r\n\r\n")
	return b.Bytes()
}

// parse_header_lines
func parseHeaderLines(lines [][]byte, what string) ([]header, *httpError) {
	if len(lines) > maxHeaders {
		return nil, herr(431, "too many "+what+" lines")
	}
	total := 0
	for _, l := range lines {
		total += len(l) + 2
	}
	if total > maxHeadBytes {
		return nil, herr(431, what+" section too large")
	}
	out := make([]header, 0, len(lines))
	for _, line := range lines {
		if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
			return nil, herr(400, "obsolete line folding")
		}
		i := bytes.IndexByte(line, ':')
		if i < 0 || !isToken(line[:i]) {
			return nil, herr(400, "malformed "+what+" line")
		}
		v := trimOWS(line[i+1:])
		if !isValue(v) {
			return nil, herr(400, "invalid character in "+what+" value")
		}
		out = append(out, header{string(line[:i]), string(v)})
	}
	return out, nil
}

// _list: comma-separated elements, OWS-trimmed, lower-case, empty ones dropped.
func listOf(values []string) []string {
	var out []string
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			if t = trimOWSs(t); t != "" {
				out = append(out, lowerASCII(t))
			}
		}
	}
	return out
}

// _codings: Transfer-Encoding elements, OWS-trimmed, lower-case, "" for an
// empty one (refused: ambiguous).
func codingsOf(values []string) []string {
	var out []string
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			out = append(out, lowerASCII(trimOWSs(t)))
		}
	}
	return out
}

func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			return strings.Map(func(r rune) rune {
				if r >= 'A' && r <= 'Z' {
					return r + 32
				}
				return r
			}, s)
		}
	}
	return s
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

// isVersion: ^HTTP/1\.[01]$ (by hand: two regexps a request were ~10% of the parsing)
func isVersion(b []byte) bool {
	return len(b) == 8 && string(b[:7]) == "HTTP/1." && (b[7] == '0' || b[7] == '1')
}

// isLength: ^[0-9]{1,18}$
func isLength(s string) bool {
	if len(s) == 0 || len(s) > 18 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func parseRequestHead(block []byte) (*requestHead, *httpError) {
	eol := bytes.Index(block, []byte("\r\n"))
	line := block
	if eol >= 0 {
		line = block[:eol]
	}
	if len(line) > maxRequestLine {
		return nil, herr(414, "request line too long")
	}
	n := bytes.Count(block, []byte("\r\n"))
	if bytes.Count(block, []byte("\r")) != n || bytes.Count(block, []byte("\n")) != n {
		return nil, herr(400, "bare CR or LF in message head")
	}
	parts := bytes.Split(line, []byte(" "))
	if len(parts) != 3 || len(parts[1]) == 0 {
		return nil, herr(400, "malformed request line")
	}
	if !isToken(parts[0]) {
		return nil, herr(400, "invalid method")
	}
	if !isVersion(parts[2]) {
		if bytes.HasPrefix(parts[2], []byte("HTTP/")) && len(parts[2]) == 8 {
			return nil, herr(505, "HTTP version not supported")
		}
		return nil, herr(400, "malformed HTTP version")
	}
	for _, c := range parts[1] {
		if c >= 0x80 {
			return nil, herr(400, "non-ASCII request-target")
		}
	}
	method, target, version := string(parts[0]), string(parts[1]), string(parts[2])
	if method == "CONNECT" {
		return nil, herr(400, "CONNECT (authority-form) is not proxied")
	}
	if !methods[method] {
		return nil, herr(501, "unknown method")
	}
	headers := []header{}
	if eol > 0 {
		var e *httpError
		if headers, e = parseHeaderLines(bytes.Split(block[eol+2:], []byte("\r\n")), "header"); e != nil {
			return nil, e
		}
	}
	path, authority, hasAuth, e := parseTarget(target)
	if e != nil {
		return nil, e
	}
	req := &requestHead{method: method, target: target, path: path, version: version,
		headers: headers, absolute: hasAuth, contentLength: -1, keepAlive: true}
	req.raw = make([]byte, 0, len(block)+4)
	req.raw = append(append(req.raw, block...), "\r\n\r\n"...)
	by := map[string][]string{}
	for _, h := range headers {
		k := lowerASCII(h.name)
		by[k] = append(by[k], h.value)
	}
	hosts := by["host"]
	if len(hosts) > 1 {
		return nil, herr(400, "more than one Host header")
	}
	if len(hosts) == 1 {
		if !isHost(hosts[0]) {
			return nil, herr(400, "invalid Host header")
		}
		req.host = hosts[0]
	} else if version == "HTTP/1.1" && !hasAuth {
		return nil, herr(400, "missing Host header")
	}
	if hasAuth {
		if len(hosts) == 1 && lowerASCII(hosts[0]) != lowerASCII(authority) {
			return nil, herr(400, "Host header differs from the absolute-form authority")
		}
		if len(hosts) == 0 {
			req.host = authority
			req.headers = append(req.headers, header{"Host", authority})
		}
	}
	cls, tes := by["content-length"], by["transfer-encoding"]
	if len(cls) > 0 && len(tes) > 0 {
		return nil, herr(400, "both Content-Length and Transfer-Encoding")
	}
	if len(cls) > 1 {
		return nil, herr(400, "more than one Content-Length")
	}
	if len(cls) == 1 {
		if !isLength(cls[0]) {
			return nil, herr(400, "invalid Content-Length")
		}
		req.contentLength, _ = strconv.ParseInt(cls[0], 10, 64)
	}
	if len(tes) > 0 {
		if version == "HTTP/1.0" {
			return nil, herr(400, "Transfer-Encoding in an HTTP/1.0 request")
		}
		codings := codingsOf(tes)
		if !(len(codings) == 1 && codings[0] == "chunked") {
			nch := 0
			for _, c := range codings {
				if c == "chunked" {
					nch++
				}
			}
			if codings[len(codings)-1] != "chunked" || nch > 1 || contains(codings, "") {
				return nil, herr(400, "Transfer-Encoding does not end in exactly one chunked")
			}
			return nil, herr(501, "unsupported Transfer-Encoding")
		}
		req.chunked = true
	}
	conn := listOf(by["connection"])
	if version == "HTTP/1.0" {
		req.keepAlive = false
	} else {
		req.keepAlive = !contains(conn, "close")
	}
	if expect := listOf(by["expect"]); len(expect) > 0 {
		if len(expect) != 1 || expect[0] != "100-continue" {
			return nil, herr(417, "unsupported Expect")
		}
		req.expect = true
	}
	if up, ok := by["upgrade"]; ok {
		if u := listOf(up); contains(conn, "upgrade") && len(u) == 1 && u[0] == "websocket" {
			if req.hasBody() {
				return nil, herr(400, "Upgrade request with a body")
			}
			req.upgrade = true
		} else {
			req.stripUpg = true
		}
	}
	return req, nil
}

// without_upgrade: headers minus Upgrade/HTTP2-Settings and their Connection tokens.
func withoutUpgrade(hs []header) []header {
	var out []header
	for _, h := range hs {
		ln := lowerASCII(h.name)
		if ln == "upgrade" || ln == "http2-settings" {
			continue
		}
		if ln == "connection" {
			var toks []string
			for _, t := range strings.Split(h.value, ",") {
				t = trimOWSs(t)
				if l := lowerASCII(t); t != "" && l != "upgrade" && l != "http2-settings" {
					toks = append(toks, t)
				}
			}
			if len(toks) == 0 {
				continue
			}
			h = header{h.name, strings.Join(toks, ", ")}
		}
		out = append(out, h)
	}
	return out
}
