// Bodies and tunnels of a proxied connection, as _relay.py's BodyRelay: exact
// lengths, chunked bodies re-encoded with their trailers filtered, the byte
// tunnel after a 101. Every wait is armed with its timeout first.
package main

import (
	"bytes"
	"log"
	"net"
	"strconv"
	"sync"
	"time"
)

// relayExact: exactly n bytes from src to dst; prefix goes out with the first
// piece (or, with flushOnErr, also when src ends first: bytes the Python proxy
// had already written).
func relayExact(src *rd, dst *net.TCPConn, n int64, timeout time.Duration, prefix []byte,
	flushOnErr bool) error {
	for n > 0 {
		src.arm(timeout)
		max := int64(readSize)
		if n < max {
			max = n
		}
		data, err := src.readSome(int(max))
		if err != nil {
			if flushOnErr && len(prefix) > 0 {
				write(dst, timeout, prefix)
			}
			return errClosed
		}
		n -= int64(len(data))
		if len(prefix) > 0 {
			data, prefix = append(prefix[:len(prefix):len(prefix)], data...), nil
		}
		if err := write(dst, timeout, data); err != nil {
			return err
		}
	}
	if len(prefix) > 0 {
		return write(dst, timeout, prefix)
	}
	return nil
}

// relayChunked: a chunked body re-encoded (extensions dropped), trailers
// validated and filtered; errStatus 400 (request: the client is told) or 502.
// prefix (a response head) and each size line and CRLF go out when the Python
// proxy writes them, at the latest before an error ends the connection.
func (k *conn) relayChunked(src *rd, dst *net.TCPConn, timeout time.Duration, errStatus int,
	prefix []byte) error {
	pending := prefix
	closed := func() error {
		if len(pending) > 0 {
			write(dst, timeout, pending)
		}
		return errClosed
	}
	fail := func(e *httpError) error {
		closed()
		if verbose {
			log.Printf("proxy %d: %s: %v", k.l.port, k.clientIP, e)
		}
		if errStatus == 400 {
			k.send(errorResponse(400, "Bad Request", e.reason+"\n", true))
		}
		return errClosed
	}
	for {
		src.arm(timeout)
		line, err := src.readUntil([]byte("\r\n"), streamLimit)
		if err == errOverrun {
			return fail(herr(errStatus, "chunk-size line too long"))
		} else if err != nil {
			return closed()
		}
		src.consume(len(line))
		size, e := parseChunkSize(line[:len(line)-2])
		if e != nil {
			return fail(e)
		}
		if size == 0 {
			trailers, err, e := k.readTrailers(src, timeout)
			if err == errOverrun {
				return fail(herr(errStatus, "chunk-size line too long"))
			} else if err != nil {
				return closed()
			} else if e != nil {
				return fail(e)
			}
			out := append(pending, "0\r\n"...)
			for _, t := range trailers {
				if !forbiddenTrailers[lowerASCII(t.name)] {
					out = append(append(append(append(out, t.name...), ": "...), t.value...), "\r\n"...)
				}
			}
			return write(dst, timeout, append(out, "\r\n"...))
		}
		pending = append(pending, strconv.FormatInt(size, 16)+"\r\n"...)
		err = relayExact(src, dst, size, timeout, pending, true)
		pending = nil
		if err != nil {
			return err
		}
		src.arm(timeout)
		crlf, err := src.readExactly(2)
		if err != nil {
			return errClosed
		}
		if string(crlf) != "\r\n" {
			return fail(herr(errStatus, "missing CRLF after chunk data"))
		}
		pending = []byte("\r\n")
	}
}

func (k *conn) readTrailers(src *rd, timeout time.Duration) ([]header, error, *httpError) {
	var lines [][]byte
	total := 0
	for {
		src.arm(timeout)
		line, err := src.readUntil([]byte("\r\n"), streamLimit)
		if err != nil {
			return nil, err, nil
		}
		src.consume(len(line))
		if len(line) == 2 {
			break
		}
		total += len(line)
		if total > maxHeadBytes || len(lines) >= 100 || len(line) > maxChunkLine*2 {
			return nil, nil, herr(431, "trailers too large")
		}
		body := line[:len(line)-2]
		if bytes.ContainsAny(body, "\r\n") {
			return nil, nil, herr(400, "bare CR or LF in trailer")
		}
		lines = append(lines, append([]byte(nil), body...))
	}
	hs, e := parseHeaderLines(lines, "trailer")
	return hs, nil, e
}

// tunnel: bytes both ways after a 101, no deadline, each direction half-closed at its end.
func (k *conn) tunnel() {
	k.c.SetDeadline(time.Time{})
	k.up.SetDeadline(time.Time{})
	var wg sync.WaitGroup
	pump := func(src *rd, dst *net.TCPConn) {
		defer wg.Done()
		src.deadline = time.Time{}
		for {
			data, err := src.readSome(readSize)
			if err != nil {
				break
			}
			if _, err := dst.Write(data); err != nil {
				break
			}
		}
		dst.CloseWrite()
	}
	wg.Add(2)
	go pump(k.r, k.up)
	pump(k.ur, k.c)
	wg.Wait()
}
