// Response heads, chunk-size lines, trailers and the proxy's own answers
// (parse_response_head, parse_chunk_size, filter_trailers, error_response of _wire.py).
package main

import (
	"bytes"
	"strconv"
	"strings"
)

// _STATUS: HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?
func statusOf(line []byte) int {
	if len(line) < 12 || string(line[:7]) != "HTTP/1." || (line[7] != '0' && line[7] != '1') ||
		line[8] != ' ' || line[9] < '1' || line[9] > '9' || line[10] < '0' || line[10] > '9' ||
		line[11] < '0' || line[11] > '9' {
		return 0
	}
	if len(line) > 12 && (line[12] != ' ' || !isValue(line[13:])) {
		return 0
	}
	return int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
}

type responseHead struct {
	status        int
	version       string
	raw           []byte
	contentLength int64 // -1: none
	chunked       bool
	close         bool
}

// asciiFoldEq: b equals lower (lower-case ASCII) but for the case of ASCII letters.
func asciiFoldEq(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c >= 'A' && c <= 'Z' {
			c += 32
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// validLines: the _HEADER_SECTION check (token ":" value CRLF, at most the limits)
// or parse_header_lines over the lines: both refuse the same sections.
func validSection(section []byte) bool {
	if len(section) > maxHeadBytes || bytes.Count(section, []byte("\n")) > maxHeaders {
		return false
	}
	for len(section) > 0 {
		i := bytes.Index(section, []byte("\r\n"))
		if i < 0 {
			return false
		}
		line := section[:i]
		section = section[i+2:]
		c := bytes.IndexByte(line, ':')
		if c < 0 || !isToken(line[:c]) || !isValue(line[c+1:]) {
			return false
		}
	}
	return true
}

// parseResponseHead: raw ends with CRLFCRLF; nil when the upstream's head is refused (502).
func parseResponseHead(raw []byte) *responseHead {
	eol := bytes.Index(raw, []byte("\r\n"))
	st := statusOf(raw[:eol])
	if st == 0 {
		return nil
	}
	section := raw[eol+2 : len(raw)-2]
	if !validSection(section) {
		return nil
	}
	resp := &responseHead{status: st, version: string(raw[:8]), raw: raw, contentLength: -1}
	var cls, tes, conn []string
	for rest := section; len(rest) > 0; { // validSection: CRLF-terminated token ":" value lines
		i := bytes.Index(rest, []byte("\r\n"))
		line := rest[:i]
		rest = rest[i+2:]
		c := bytes.IndexByte(line, ':')
		var to *[]string
		switch name := line[:c]; { // a token: ASCII, so case-folding ASCII is lowerASCII's
		case asciiFoldEq(name, "content-length"):
			to = &cls
		case asciiFoldEq(name, "transfer-encoding"):
			if bytes.IndexByte(line[c+1:], '\t') >= 0 {
				// llhttp (Node's client, httptools) reads "chunked<HTAB>" as not
				// chunked, to the end of the connection: framed as chunked here,
				// the next response would be read from its body. (_wire.py too.)
				return nil
			}
			to = &tes
		case asciiFoldEq(name, "connection"):
			to = &conn
		default:
			continue
		}
		*to = append(*to, lowerASCII(string(trimOWS(line[c+1:]))))
	}
	if len(tes) > 0 {
		if len(cls) > 0 {
			return nil
		}
		codings := codingsOf(tes)
		if contains(codings, "") {
			return nil // "chunked,": llhttp's reading is not chunked (see above)
		}
		if codings[len(codings)-1] != "chunked" {
			resp.close = true // the body runs to the end of the connection
		} else {
			if len(codings) != 1 {
				return nil
			}
			resp.chunked = true
		}
	} else if len(cls) > 0 {
		vals := listOf(cls) // exactly one distinct value, a length
		if len(vals) == 0 || !isLength(vals[0]) {
			return nil
		}
		for _, v := range vals[1:] {
			if v != vals[0] {
				return nil
			}
		}
		resp.contentLength, _ = strconv.ParseInt(vals[0], 10, 64)
	}
	cl := listOf(conn)
	if contains(cl, "close") || (resp.version == "HTTP/1.0" && !contains(cl, "keep-alive")) {
		resp.close = true
	}
	return resp
}

func parseChunkSize(line []byte) (int64, *httpError) {
	if len(line) > maxChunkLine {
		return 0, herr(400, "chunk-size line too long")
	}
	size, ext := line, []byte(nil)
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		size, ext = line[:i], line[i+1:]
	}
	if len(ext) > 0 {
		size = bytes.TrimRight(size, " \t")
		if bytes.ContainsAny(ext, "\r\n\x00") {
			return 0, herr(400, "invalid chunk extension")
		}
	}
	if len(size) == 0 || len(size) > maxChunkSizeDigits {
		return 0, herr(400, "invalid chunk size")
	}
	for _, c := range size {
		if !isHex(c) {
			return 0, herr(400, "invalid chunk size")
		}
	}
	n, _ := strconv.ParseInt(string(size), 16, 64)
	return n, nil
}

var forbiddenTrailers = map[string]bool{}

func init() {
	for _, n := range strings.Fields("transfer-encoding content-length host connection keep-alive " +
		"upgrade proxy-connection te trailer expect max-forwards range if-match if-none-match " +
		"if-modified-since if-unmodified-since if-range cache-control pragma authorization " +
		"proxy-authorization www-authenticate proxy-authenticate cookie set-cookie " +
		"content-encoding content-type content-range age date expires location retry-after vary " +
		"warning http2-settings") {
		forbiddenTrailers[n] = true
	}
}

var statusText = map[int]string{400: "Bad Request", 403: "Forbidden", 414: "URI Too Long",
	417: "Expectation Failed", 431: "Request Header Fields Too Large", 501: "Not Implemented",
	502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
	505: "HTTP Version Not Supported"}

func errorResponse(status int, reason string, body string, close bool) []byte {
	head := "HTTP/1.1 " + strconv.Itoa(status) + " " + reason + "\r\nContent-Type: text/plain\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n"
	if close {
		head += "Connection: close\r\n"
	}
	return []byte(head + "\r\n" + body)
}

func statusError(status int, body string) []byte {
	t, ok := statusText[status]
	if !ok {
		t = "Error"
	}
	return errorResponse(status, t, body, true)
}

const accessDenied = "Access denied"

func deniedResponse(close bool) []byte { return errorResponse(403, "Forbidden", accessDenied, close) }
