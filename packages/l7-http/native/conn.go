// One client connection, as _proxy.py's _Conn and _relay.py's BodyRelay:
// request heads read and judged one by one (keep-alive, pipelining), bodies
// streamed (chunked ones re-encoded, trailers filtered), responses relayed,
// 101 tunnelled, every wait under the listener's timeouts.
package main

import (
	"bytes"
	"errors"
	"log"
	"net"
	"sync"
	"syscall"
	"time"
)

const readSize = 64 * 1024

var errClosed = errors.New("connection closed")

// idleCheck: an upstream connection idle longer than this is checked for a
// close (MSG_PEEK) before it is reused.
const idleCheck = 20 * time.Millisecond

type conn struct {
	l          *listener
	c          *net.TCPConn
	r          *rd
	mu         sync.Mutex // guards up against close() from the listener's removal
	up         *net.TCPConn
	ur         *rd
	clientIP   string
	clientPort int
	dstIP      string
	dstPort    int
	dstAddr    *net.TCPAddr
	ident      int
	cfg        *listenerCfg
	upstream   bool      // a fixed upstream (tests): no loop check
	upUsed     time.Time // the end of the last response from up
	mark       uint32
	spoof      bool
}

func newConn(l *listener, c *net.TCPConn) *conn {
	peer := c.RemoteAddr().(*net.TCPAddr)
	local := c.LocalAddr().(*net.TCPAddr)
	cfg := l.cfg // l.mu is held: a copy, so a later 'U' does not race with this connection
	k := &conn{l: l, c: c, r: newRd(c), clientIP: peer.IP.String(), clientPort: peer.Port,
		cfg: &cfg, dstAddr: local, upstream: l.upstream != nil, mark: l.mark, spoof: l.spoof}
	if l.upstream != nil {
		k.dstAddr = l.upstream
	}
	k.dstIP, k.dstPort = k.dstAddr.IP.String(), k.dstAddr.Port
	k.ident = takeSourceIdentity(c)
	return k
}

// takeSourceIdentity: the identity the datapath put in the to-proxy mark the
// accepted socket inherited (core/marks.py identity_of_to_proxy_mark); the mark is cleared.
func takeSourceIdentity(c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	mark := 0
	rc.Control(func(fd uintptr) {
		m, e := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK)
		if e != nil || m == 0 {
			return
		}
		mark = int(uint32(m))
		syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, 0)
	})
	if mark&0x0F00 != 0x0200 || mark&0x8000 == 0 {
		return 0
	}
	return (mark >> 16) & 0xFFFF
}

func (k *conn) close() {
	k.c.Close()
	k.mu.Lock()
	if k.up != nil {
		k.up.Close()
		k.up = nil
	}
	k.mu.Unlock()
}

func (k *conn) setUp(up *net.TCPConn) {
	k.mu.Lock()
	if k.up != nil {
		k.up.Close()
	}
	k.up = up
	k.mu.Unlock()
}

func (k *conn) run() {
	defer k.l.done(k)
	defer k.close()
	if !k.upstream && k.l.loopsBack(k.dstAddr) {
		log.Printf("proxy %d: direct connection from %s refused", k.l.port, k.clientIP)
		return
	}
	first := true
	for {
		head, ok := k.readHead(first)
		if !ok {
			return
		}
		first = false
		t0 := time.Now()
		req, e := parseRequestHead(head)
		if e != nil {
			k.l.errors.Add(1)
			k.send(statusError(e.status, e.reason+"\n"))
			return
		}
		if !k.handle(req, t0) {
			return
		}
	}
}

func (k *conn) readHead(first bool) ([]byte, bool) {
	if first {
		k.r.arm(k.cfg.header)
	} else {
		k.r.arm(k.cfg.idle)
		if k.r.buffered() == 0 && k.r.fill() != nil {
			return nil, false
		}
		// the next request started: the whole head gets header_timeout
		if dl := time.Now().Add(k.cfg.header); dl.Before(k.r.deadline) {
			k.r.deadline = dl
		}
	}
	for {
		blk, err := k.r.readUntil([]byte("\r\n\r\n"), streamLimit)
		if err == errOverrun {
			k.send(statusError(431, "request head too large\n"))
			return nil, false
		}
		if err != nil {
			if len(bytes.Trim(k.r.pending(), "\r\n")) > 0 && !isTimeout(err) {
				k.send(errorResponse(400, "Bad Request", "truncated request\n", true))
			}
			return nil, false
		}
		k.r.consume(len(blk))
		blk = bytes.TrimLeft(blk, "\r\n")
		if len(blk) > 0 {
			if len(blk) < 4 {
				return nil, false
			}
			return blk[:len(blk)-4], true
		}
	}
}

func write(c *net.TCPConn, d time.Duration, data []byte) error {
	c.SetWriteDeadline(time.Now().Add(d))
	_, err := c.Write(data)
	return err
}

func (k *conn) send(data []byte) error { return write(k.c, k.cfg.body, data) }

func (k *conn) handle(req *requestHead, t0 time.Time) bool {
	k.l.requests.Add(1)
	pol := k.l.eng.policyFor(k)
	allowed, acts := decide(pol, req)
	if !allowed {
		k.l.denied.Add(1)
		k.flow(req, pol, verdictDropped, false, 403, 0)
		keep := req.keepAlive && pol != nil && !pol.deny && !req.upgrade && !req.expect
		if keep && req.hasBody() {
			if req.chunked || req.contentLength > maxDrain {
				keep = false
			} else {
				k.r.arm(k.cfg.body)
				if _, err := k.r.readExactly(int(req.contentLength)); err != nil {
					return false
				}
			}
		}
		return k.send(deniedResponse(!keep)) == nil && keep
	}
	k.flow(req, pol, verdictForwarded, false, 0, 0)
	hs, changed := req.headers, false
	if len(acts) > 0 {
		var ok bool
		if hs, ok = applyActions(hs, acts); !ok {
			return false
		}
		changed = true
	}
	if req.stripUpg {
		hs, changed = withoutUpgrade(hs), true
	}
	if req.expect {
		var kept []header
		for _, h := range hs {
			if lowerASCII(h.name) != "expect" {
				kept = append(kept, h)
			}
		}
		hs, changed = kept, true
	}
	if !k.ensureUpstream() {
		k.send(statusError(503, "upstream connect failed\n"))
		return false
	}
	head := req.serialize(hs, changed)
	if req.expect && req.hasBody() {
		if k.send([]byte("HTTP/1.1 100 Continue\r\n\r\n")) != nil {
			return false
		}
	}
	var err error
	switch {
	case req.chunked: // the head goes out first, as the Python proxy's write does
		if err = write(k.up, k.cfg.body, head); err == nil {
			err = k.relayChunked(k.r, k.up, k.cfg.body, 400, nil)
		}
	case req.contentLength > 0:
		err = relayExact(k.r, k.up, req.contentLength, k.cfg.body, head, false)
	default:
		err = write(k.up, k.cfg.body, head)
	}
	if err != nil {
		return false
	}
	return k.relayResponse(req, pol, t0)
}

func (k *conn) ensureUpstream() bool {
	if k.up != nil {
		// An upstream closes idle connections; one busy a moment ago is
		// reused without asking the kernel (a syscall per request).
		if k.ur.buffered() > 0 || time.Since(k.upUsed) < idleCheck || !peerClosed(k.up) {
			return true
		}
		k.setUp(nil)
	}
	l := k.l
	mark := k.mark
	if k.ident != 0 {
		mark = withSourceIdentity(mark, uint32(k.ident))
	}
	d := net.Dialer{Timeout: k.cfg.connect}
	spoof := k.spoof && (net.ParseIP(k.clientIP).To4() != nil) == (k.dstAddr.IP.To4() != nil)
	if spoof {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(k.clientIP)}
	}
	d.Control = func(network, address string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) {
			if mark != 0 {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, int(int32(mark)))
			}
			if serr == nil && spoof {
				if k.dstAddr.IP.To4() != nil {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_TRANSPARENT, 1)
				} else {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IPV6, 75, 1) // IPV6_TRANSPARENT
				}
			}
		})
		return serr
	}
	c, err := d.Dial("tcp", k.dstAddr.String())
	if err != nil {
		if verbose {
			log.Printf("proxy %d: upstream %s unreachable: %v", l.port, k.dstAddr, err)
		}
		return false
	}
	up := c.(*net.TCPConn)
	k.setUp(up)
	k.ur = newRd(up)
	return true
}

// withSourceIdentity: core/marks.py with_source_identity.
func withSourceIdentity(mark, identity uint32) uint32 {
	magic := mark & 0x0F00
	if identity == 0 || identity > 0xFFFF || (magic != 0x0A00 && magic != 0x0B00) {
		return mark
	}
	return mark&0xFFFF | identity<<16
}

func (k *conn) relayResponse(req *requestHead, pol *policy, t0 time.Time) bool {
	var resp *responseHead
	for {
		k.ur.arm(k.cfg.upstream)
		raw, err := k.ur.readUntil([]byte("\r\n\r\n"), streamLimit)
		if err == nil {
			raw = append([]byte(nil), raw...)
			k.ur.consume(len(raw))
			resp = parseResponseHead(raw)
		}
		if resp == nil {
			status := 502
			if isTimeout(err) {
				status = 504
			}
			if verbose {
				log.Printf("proxy %d: bad/no response from %s: %v", k.l.port, k.dstAddr, err)
			}
			k.flow(req, pol, verdictError, true, status, time.Since(t0).Nanoseconds())
			k.send(statusError(status, "upstream response failed\n"))
			return false
		}
		if resp.status >= 100 && resp.status < 200 && resp.status != 101 {
			if k.send(raw) != nil {
				return false
			}
			resp = nil
			continue
		}
		break
	}
	k.flow(req, pol, verdictForwarded, true, resp.status, time.Since(t0).Nanoseconds())
	if resp.status == 101 {
		if k.send(resp.raw) == nil {
			k.tunnel()
		}
		return false
	}
	var err error
	noBody := req.method == "HEAD" || resp.status == 204 || resp.status == 304
	switch {
	case noBody || resp.contentLength == 0:
		err = k.send(resp.raw)
	case resp.chunked:
		err = k.relayChunked(k.ur, k.c, k.cfg.upstream, 502, resp.raw)
	case resp.contentLength > 0:
		err = relayExact(k.ur, k.c, resp.contentLength, k.cfg.upstream, resp.raw, false)
	default: // delimited by the end of the upstream connection
		if k.send(resp.raw) == nil {
			for {
				k.ur.arm(k.cfg.upstream)
				data, err := k.ur.readSome(readSize)
				if err != nil || k.send(data) != nil {
					break
				}
			}
		}
		return false
	}
	if err != nil {
		return false
	}
	if resp.close {
		k.setUp(nil)
	}
	k.upUsed = time.Now()
	return req.keepAlive && !resp.close
}
