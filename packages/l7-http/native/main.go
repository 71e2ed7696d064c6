// axoneme-l7-http: the native HTTP/1.1 engine of the agent's L7 proxy
// (issue 17), the way Cilium runs Envoy beside its agent.
//
// The agent keeps the kernel side: it makes the IP_TRANSPARENT listening
// sockets and the TPROXY rules, and hands each listener to this process over
// the control socket (SCM_RIGHTS). Per request the engine asks the agent for
// the policy of the connection (listener, client, original destination, the
// source identity of the accepted socket's mark), caches the answer per
// (listener, addresses, identity) until the agent says the policy changed,
// and sends the L7 flow records back in batches; the agent emits them as the
// Python proxy's. The HTTP semantics are the Python proxy's
// (packages/l7-http/src/axoneme/l7/http): the same refusals, normalisation,
// rule matching and answers; the tests run both engines on the same bytes.
//
// Control protocol (one stream socket, fd given by --control-fd): frames of
// a 4-byte big-endian length, a type byte and a JSON payload.
//
//	agent -> engine: L add listener (+ the fd), R remove listener, P policy
//	                 answer, I policy changed, S sync (flush flows and stats)
//	engine -> agent: Q policy query, F flow records, T stats, r removed, s synced
package main

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"log"
	"net"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var verbose bool

type listenerCfg struct {
	header, idle, body, connect, upstream time.Duration
}

type listenerMsg struct {
	ID       int64     `json:"id"`
	Mark     uint32    `json:"mark"`
	Spoof    bool      `json:"spoof"`
	Upstream []any     `json:"upstream"` // [ip, port] or null
	MaxConns int       `json:"max_connections"`
	Timeouts []float64 `json:"timeouts"` // header, idle, body, connect, upstream (s)
}

type listener struct {
	id       int64
	eng      *engine
	ln       *net.TCPListener
	addr     *net.TCPAddr
	port     int
	mark     uint32
	spoof    bool
	upstream *net.TCPAddr
	maxConns int
	cfg      listenerCfg

	mu     sync.Mutex
	conns  map[*conn]struct{}
	closed bool

	requests, denied, errors, refused atomic.Int64
}

func (l *listener) loopsBack(dst *net.TCPAddr) bool {
	return dst.Port == l.port && (dst.IP.Equal(l.addr.IP) || l.addr.IP.IsUnspecified())
}

func (l *listener) done(k *conn) {
	l.mu.Lock()
	delete(l.conns, k)
	l.mu.Unlock()
}

func (l *listener) serve() {
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			l.mu.Lock()
			closed := l.closed
			l.mu.Unlock()
			if closed {
				return
			}
			log.Printf("proxy %d: accept: %v", l.port, err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		l.mu.Lock()
		if l.closed || len(l.conns) >= l.maxConns {
			l.mu.Unlock()
			l.refused.Add(1)
			log.Printf("http proxy %d: connection limit %d reached, refusing", l.port, l.maxConns)
			l.eng.flush()
			c.Close()
			continue
		}
		k := newConn(l, c)
		l.conns[k] = struct{}{}
		l.mu.Unlock()
		go k.run()
	}
}

func (l *listener) stop() {
	l.mu.Lock()
	l.closed = true
	conns := make([]*conn, 0, len(l.conns))
	for k := range l.conns {
		conns = append(conns, k)
	}
	l.mu.Unlock()
	l.ln.Close()
	for _, k := range conns {
		k.close()
	}
}

type polKey struct {
	lid          int64
	client, dst  string
	dport, ident int
}

type query struct {
	key polKey
	ch  chan *policy
}

type engine struct {
	ctl   *net.UnixConn
	wmu   sync.Mutex // one frame at a time on ctl
	mu    sync.Mutex
	lst   map[int64]*listener
	fds   []int
	cache map[polKey]*policy
	gen   int64
	qid   int64
	qs    map[int64]query
	fmu   sync.Mutex
	flows []byte // JSON records, comma-separated
	stats []byte // the last stats frame sent
}

func (e *engine) frame(t byte, payload []byte) {
	b := make([]byte, 5, 5+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)+1))
	b[4] = t
	b = append(b, payload...)
	e.wmu.Lock()
	_, err := e.ctl.Write(b)
	e.wmu.Unlock()
	if err != nil {
		log.Fatalf("control socket: %v", err)
	}
}

func (e *engine) send(t byte, v any) {
	p, _ := json.Marshal(v)
	e.frame(t, p)
}

// policyFor: the cached policy of k's (listener, addresses, identity), else the agent's answer.
func (e *engine) policyFor(k *conn) *policy {
	key := polKey{k.l.id, k.clientIP, k.dstIP, k.dstPort, k.ident}
	e.mu.Lock()
	if p, ok := e.cache[key]; ok {
		e.mu.Unlock()
		return p
	}
	e.qid++
	q := query{key, make(chan *policy, 1)}
	id := e.qid
	e.qs[id] = q
	e.mu.Unlock()
	e.send('Q', map[string]any{"q": id, "l": k.l.id, "sip": k.clientIP, "sport": k.clientPort,
		"dip": k.dstIP, "dport": k.dstPort, "ident": k.ident})
	select {
	case p := <-q.ch:
		return p
	case <-time.After(10 * time.Second): // fail closed: no answer, no forwarding
		e.mu.Lock()
		delete(e.qs, id)
		e.mu.Unlock()
		log.Printf("no policy answer for %s -> %s:%d", k.clientIP, k.dstIP, k.dstPort)
		return nil
	}
}

func (e *engine) answer(m *policyMsg) {
	pol := compilePolicy(m)
	e.mu.Lock()
	q, ok := e.qs[m.Q]
	delete(e.qs, m.Q)
	if ok && m.Gen == e.gen {
		if len(e.cache) > 65536 {
			e.cache = map[polKey]*policy{}
		}
		e.cache[q.key] = pol
	}
	e.mu.Unlock()
	if ok {
		q.ch <- pol
	}
}

func (e *engine) flush() {
	e.fmu.Lock()
	defer e.fmu.Unlock()
	if len(e.flows) > 0 {
		batch := append(append([]byte{'['}, e.flows...), ']')
		e.flows = e.flows[:0]
		e.frame('F', batch)
	}
	stats := map[int64][4]int64{}
	e.mu.Lock()
	for id, l := range e.lst {
		stats[id] = [4]int64{l.requests.Load(), l.denied.Load(), l.errors.Load(), l.refused.Load()}
	}
	e.mu.Unlock()
	p, _ := json.Marshal(stats)
	if string(p) != string(e.stats) {
		e.stats = p
		e.frame('T', p)
	}
}

func (e *engine) addListener(m *listenerMsg, fd int) {
	f := os.NewFile(uintptr(fd), "listener")
	nl, err := net.FileListener(f)
	f.Close()
	if err != nil {
		log.Printf("listener %d: %v", m.ID, err)
		return
	}
	l := &listener{id: m.ID, eng: e, ln: nl.(*net.TCPListener), conns: map[*conn]struct{}{}}
	l.addr = l.ln.Addr().(*net.TCPAddr)
	l.port = l.addr.Port
	l.configure(m)
	e.mu.Lock()
	e.lst[m.ID] = l
	e.mu.Unlock()
	go l.serve()
}

// configure: the listener's settings (on creation, or 'U' under l.mu: new connections see them).
func (l *listener) configure(m *listenerMsg) {
	l.mark, l.spoof, l.maxConns = m.Mark, m.Spoof, m.MaxConns
	sec := func(i int) time.Duration { return time.Duration(m.Timeouts[i] * float64(time.Second)) }
	l.cfg = listenerCfg{header: sec(0), idle: sec(1), body: sec(2), connect: sec(3), upstream: sec(4)}
	l.upstream = nil
	if len(m.Upstream) == 2 {
		ip, _ := m.Upstream[0].(string)
		port, _ := m.Upstream[1].(float64)
		l.upstream = &net.TCPAddr{IP: net.ParseIP(ip), Port: int(port)}
	}
}

func (e *engine) removeListener(id int64) {
	e.mu.Lock()
	l := e.lst[id]
	delete(e.lst, id)
	e.mu.Unlock()
	if l != nil {
		l.stop()
	}
	e.flush()
	e.send('r', map[string]int64{"id": id})
}

// readControl: frames from the agent; fds (SCM_RIGHTS) queue up for the L frames.
func (e *engine) readControl() {
	buf := make([]byte, 0, 1<<16)
	rbuf := make([]byte, 1<<16)
	oob := make([]byte, syscall.CmsgSpace(64*4))
	for {
		n, oobn, _, _, err := e.ctl.ReadMsgUnix(rbuf, oob)
		if oobn > 0 {
			if msgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if fds, err := syscall.ParseUnixRights(&m); err == nil {
						e.fds = append(e.fds, fds...)
					}
				}
			}
		}
		if n == 0 || err != nil {
			return // the agent went away
		}
		buf = append(buf, rbuf[:n]...)
		for len(buf) >= 4 {
			size := int(binary.BigEndian.Uint32(buf))
			if len(buf) < 4+size {
				break
			}
			e.dispatch(buf[4], buf[5:4+size])
			buf = buf[4+size:]
		}
		buf = append(make([]byte, 0, 1<<16), buf...)
	}
}

func (e *engine) dispatch(t byte, p []byte) {
	switch t {
	case 'L':
		var m listenerMsg
		if json.Unmarshal(p, &m) != nil || len(e.fds) == 0 || len(m.Timeouts) != 5 {
			log.Fatalf("bad listener message %q", p)
		}
		fd := e.fds[0]
		e.fds = e.fds[1:]
		e.addListener(&m, fd)
	case 'U':
		var m listenerMsg
		if json.Unmarshal(p, &m) != nil || len(m.Timeouts) != 5 {
			log.Fatalf("bad listener message %q", p)
		}
		e.mu.Lock()
		l := e.lst[m.ID]
		e.mu.Unlock()
		if l != nil {
			l.mu.Lock()
			l.configure(&m)
			l.mu.Unlock()
		}
	case 'R':
		var m struct {
			ID int64 `json:"id"`
		}
		json.Unmarshal(p, &m)
		go e.removeListener(m.ID)
	case 'P':
		var m policyMsg
		if err := json.Unmarshal(p, &m); err != nil {
			log.Printf("bad policy message: %v", err)
			return
		}
		e.answer(&m)
	case 'I':
		var m struct {
			Gen int64 `json:"gen"`
		}
		json.Unmarshal(p, &m)
		e.mu.Lock()
		e.gen = m.Gen
		e.cache = map[polKey]*policy{}
		e.mu.Unlock()
	case 'S':
		e.flush()
		e.frame('s', p)
	}
}

func main() {
	fd := flag.Int("control-fd", -1, "the control socket (inherited)")
	flag.BoolVar(&verbose, "verbose", false, "log every refused request and upstream failure")
	profile := flag.String("cpuprofile", "", "write a CPU profile (pprof) here until the agent goes")
	flag.Parse()
	log.SetPrefix("axoneme-l7-http: ")
	if *fd < 0 {
		log.Fatal("--control-fd is required (the agent starts this engine)")
	}
	f := os.NewFile(uintptr(*fd), "control")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		log.Fatalf("control socket: %v", err)
	}
	debug.SetGCPercent(400)
	e := &engine{ctl: c.(*net.UnixConn), lst: map[int64]*listener{}, cache: map[polKey]*policy{},
		qs: map[int64]query{}}
	go func() {
		for range time.Tick(20 * time.Millisecond) {
			e.flush()
		}
	}()
	if *profile != "" {
		if f, err := os.Create(*profile); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	e.readControl()
}
