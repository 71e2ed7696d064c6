// L7 flow records for the agent: one JSON array per request or response,
// batched (engine.flush). Strings are the raw bytes as latin-1 code points,
// as the Python proxy decodes them.
package main

import (
	"strconv"
	"time"
)

const (
	verdictForwarded = 0
	verdictDropped   = 1
	verdictError     = 2
	maxPendingFlows  = 8 << 20 // beyond this the agent is not reading: records are dropped
)

const hexdigits = "0123456789abcdef"

func appendStr(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20 || c >= 0x7f:
			b = append(b, '\\', 'u', '0', '0', hexdigits[c>>4], hexdigits[c&15])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

func appendInt(b []byte, v int64) []byte {
	return strconv.AppendInt(append(b, ','), v, 10)
}

// flow: one record, a JSON array (an array decodes in ~60% of an object's
// time on the agent's side). DO NOT CHANGE without _engine.py's _flows:
// [listener, policy id, verdict, reply, code, latency ns, time, method,
// host, path, version, client ip, client port, dst ip, dst port(, headers
// flat: name, value, ...: requests only)].
func (k *conn) flow(req *requestHead, pol *policy, verdict int, reply bool, code int, latency int64) {
	pid := int64(-1)
	if pol != nil && !pol.deny {
		pid = pol.pid
	}
	b := make([]byte, 0, 256)
	b = append(b, '[')
	b = strconv.AppendInt(b, k.l.id, 10)
	b = appendInt(b, pid)
	b = appendInt(b, int64(verdict))
	r := int64(0)
	if reply {
		r = 1
	}
	b = appendInt(b, r)
	b = appendInt(b, int64(code))
	b = appendInt(b, latency)
	b = append(b, ',')
	b = strconv.AppendFloat(b, float64(time.Now().UnixNano())/1e9, 'f', 6, 64)
	for _, s := range [...]string{req.method, req.host, req.path, req.version, k.clientIP} {
		b = appendStr(append(b, ','), s)
	}
	b = appendInt(b, int64(k.clientPort))
	b = appendStr(append(b, ','), k.dstIP)
	b = appendInt(b, int64(k.dstPort))
	if !reply {
		b = append(b, `,[`...)
		for i, h := range req.headers {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendStr(b, h.name)
			b = appendStr(append(b, ','), h.value)
		}
		b = append(b, ']')
	}
	b = append(b, ']')
	e := k.l.eng
	e.fmu.Lock()
	if len(e.flows) < maxPendingFlows {
		if len(e.flows) > 0 {
			e.flows = append(e.flows, ',')
		}
		e.flows = append(e.flows, b...)
	}
	e.fmu.Unlock()
}
