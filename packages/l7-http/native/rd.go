// A buffered reader with asyncio StreamReader's semantics where the proxy
// depends on them (readuntil's limit, partial data at EOF) and a deadline
// armed before each wait, as the Python proxy's watchdog does.
package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

var errOverrun = errors.New("separator not found within the limit")

type rd struct {
	c        net.Conn
	buf      []byte
	r, w     int
	err      error
	deadline time.Time
	setDl    time.Time
}

func newRd(c net.Conn) *rd { return &rd{c: c, buf: make([]byte, 16*1024)} }

func (b *rd) buffered() int       { return b.w - b.r }
func (b *rd) pending() []byte     { return b.buf[b.r:b.w] }
func (b *rd) consume(n int)       { b.r += n }
func (b *rd) arm(d time.Duration) { b.deadline = time.Now().Add(d) }

func (b *rd) fill() error {
	if b.err != nil {
		return b.err
	}
	if b.r == b.w {
		b.r, b.w = 0, 0
	}
	if b.w == len(b.buf) {
		if b.r > 0 {
			copy(b.buf, b.buf[b.r:b.w])
			b.w -= b.r
			b.r = 0
		} else {
			nb := make([]byte, 2*len(b.buf))
			copy(nb, b.buf[:b.w])
			b.buf = nb
		}
	}
	if !b.deadline.Equal(b.setDl) {
		b.c.SetReadDeadline(b.deadline)
		b.setDl = b.deadline
	}
	n, err := b.c.Read(b.buf[b.w:])
	b.w += n
	if n == 0 && err != nil {
		b.err = err
		return err
	}
	return nil
}

// readUntil: the bytes up to and including sep (not consumed: see consume),
// errOverrun as asyncio's LimitOverrunError, else the read error (partial data stays pending).
func (b *rd) readUntil(sep []byte, limit int) ([]byte, error) {
	offset := 0
	for {
		data := b.buf[b.r:b.w]
		if len(data)-offset >= len(sep) {
			if i := bytes.Index(data[offset:], sep); i >= 0 {
				isep := offset + i
				if isep > limit {
					return nil, errOverrun
				}
				return data[:isep+len(sep)], nil
			}
			offset = len(data) + 1 - len(sep)
			if offset > limit {
				return nil, errOverrun
			}
		}
		if err := b.fill(); err != nil {
			return nil, err
		}
	}
}

// readSome: up to max bytes (at least one), consumed.
func (b *rd) readSome(max int) ([]byte, error) {
	if b.buffered() == 0 {
		if err := b.fill(); err != nil {
			return nil, err
		}
	}
	n := b.buffered()
	if n > max {
		n = max
	}
	out := b.buf[b.r : b.r+n]
	b.r += n
	return out, nil
}

// readExactly: n bytes, consumed (valid until the next read).
func (b *rd) readExactly(n int) ([]byte, error) {
	for b.buffered() < n {
		if err := b.fill(); err != nil {
			return nil, err
		}
	}
	out := b.buf[b.r : b.r+n]
	b.r += n
	return out, nil
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// peerClosed: whether an idle upstream connection has been closed or reset by
// its peer (asyncio's at_eof()/is_closing() on the Python proxy's reused connection).
func peerClosed(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	var one [1]byte
	rc.Read(func(fd uintptr) bool {
		n, _, e := syscall.Recvfrom(int(fd), one[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = (n == 0 && e == nil) || (e != nil && e != syscall.EAGAIN)
		return true
	})
	return closed
}
