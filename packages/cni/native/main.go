// axoneme-cni-native: the fast path of the axoneme-cni plugin.
//
// A container runtime runs the CNI plugin once per pod operation; the Python
// plugin (axoneme.cni.plugin) pays an interpreter start-up each time. This
// binary answers the per-pod commands, ADD and DEL, itself when their input
// is plainly valid, with one request to the agent, and hands everything else
// to the Python plugin (exec, with the same environment and stdin): the other
// commands, and any input the Python plugin might judge differently
// (anything this file does not accept outright), so the Python plugin stays
// the one definition of the protocol's error cases. Once a request has been
// sent the answer is mapped here, as the Python plugin maps it: a request is
// never sent twice.
//
// Built by scripts/cni-build (from scripts/bootstrap) with the Python
// plugin's path in main.fallback; built by scripts/k8s-images into the agent's
// image with main.fallback empty: the agent installs it on the node beside
// the Python plugin's zipapp, axoneme-cni-python, which it then runs.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// The Python plugin (set with -ldflags "-X main.fallback=..."; the environment
// variable AXONEME_CNI_FALLBACK overrides it). Empty: siblingFallback next to
// this executable.
var fallback = ""

// The Python plugin's name beside this executable when main.fallback is empty
// (axoneme.agent._cniinstall.PYTHON_PLUGIN).
const siblingFallback = "axoneme-cni-python"

const (
	defaultSocket = "/var/run/axoneme/axoneme.sock" // axoneme.core.apiclient.DEFAULT_SOCKET
	timeout       = 120 * time.Second               // AgentClient's default timeout
	errInvalidEnv = 4
	errUnknownCtr = 3
	errTryAgain   = 11
	errIO         = 5
	errAgent      = 100
)

// axoneme.core.names, the cases it accepts (ASCII only).
var (
	label       = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	containerID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]*$`)
	// a conservative subset of a Linux interface name (names.ifname_problem)
	ifname = regexp.MustCompile(`^[A-Za-z0-9_.@\-]{1,15}$`)
)

type cniError struct {
	code         int
	msg, details string
}

func main() {
	command := os.Getenv("CNI_COMMAND")
	if command != "ADD" && command != "DEL" {
		handOver(nil)
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		handOver(nil) // stdin cannot be re-read: the Python plugin reports the I/O error
	}
	req, ok := plainRequest(command, stdin)
	if !ok {
		handOver(stdin)
	}
	conn, err := net.DialTimeout("unix", req.socket, timeout)
	if err != nil {
		handOver(stdin) // nothing sent: the Python plugin reports it exactly
	}
	out, cerr := call(conn, req)
	conn.Close()
	if cerr != nil {
		fail(command, req.version, cerr)
	}
	if out != nil {
		os.Stdout.Write(out)
	}
	os.Exit(0)
}

type request struct {
	version, socket, path string
	body                  []byte
}

func validNames(ns, pod string) bool {
	if len(ns) > 63 || !label.MatchString(ns) {
		return false
	}
	if pod == "" {
		return true
	}
	if len(pod) > 253 {
		return false
	}
	subdomain := true
	for _, part := range strings.Split(pod, ".") {
		if !label.MatchString(part) {
			subdomain = false
			break
		}
	}
	return subdomain || containerID.MatchString(pod)
}

// cniArgs parses CNI_ARGS as plugin.parse_cni_args does; false when the
// Python plugin might see it otherwise (whitespace str.strip() would cut,
// non-ASCII, a part without '=' or key).
func cniArgs(text string) (map[string]string, bool) {
	out := map[string]string{}
	for i := 0; i < len(text); i++ {
		c := text[i]
		if c >= 0x80 || c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f) {
			return nil, false
		}
	}
	for _, part := range strings.Split(text, ";") {
		if part == "" {
			continue
		}
		key, value, found := strings.Cut(part, "=")
		if !found || key == "" {
			return nil, false
		}
		out[key] = value
	}
	return out, true
}

// plainRequest: the agent request of an ADD or DEL whose every input the
// Python plugin accepts; false otherwise.
func plainRequest(command string, stdin []byte) (request, bool) {
	var r request
	if !utf8.Valid(stdin) {
		return r, false
	}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	dec.UseNumber()
	var config map[string]any
	if dec.Decode(&config) != nil || config == nil || dec.More() {
		return r, false
	}
	if _, err := dec.Token(); err != io.EOF {
		return r, false
	}
	version, _ := config["cniVersion"].(string)
	if version != "1.0.0" && version != "1.1.0" {
		return r, false
	}
	name, _ := config["name"].(string)
	if name == "" {
		return r, false
	}
	r.socket = defaultSocket
	if s, present := config["agentSocket"]; present && s != nil {
		str, _ := s.(string)
		if str == "" {
			return r, false
		}
		r.socket = str
	}
	if m, present := config["mtu"]; present && m != nil {
		n, isNum := m.(json.Number)
		if !isNum || strings.ContainsAny(string(n), ".eE") {
			return r, false
		}
		if v, err := strconv.ParseInt(string(n), 10, 64); err != nil || v < 576 {
			return r, false
		}
	}
	r.version = version
	cid := os.Getenv("CNI_CONTAINERID")
	if cid == "" {
		return r, false
	}
	var body map[string]string
	if command == "ADD" {
		netns, ifn := os.Getenv("CNI_NETNS"), os.Getenv("CNI_IFNAME")
		if len(cid) > 1024 || !containerID.MatchString(cid) || !ifname.MatchString(ifn) ||
			ifn == "." || ifn == ".." || netns == "" || !utf8.ValidString(netns) {
			return r, false
		}
		if _, err := os.Stat(netns); err != nil {
			return r, false
		}
		args, ok := cniArgs(os.Getenv("CNI_ARGS"))
		if !ok {
			return r, false
		}
		ns := args["K8S_POD_NAMESPACE"]
		if ns == "" {
			ns = "default"
		}
		pod := args["K8S_POD_NAME"]
		if !validNames(ns, pod) {
			return r, false
		}
		r.path = "/v1/cni/add"
		body = map[string]string{"container_id": cid, "netns": netns, "ifname": ifn,
			"network": name, "cni_version": version, "namespace": ns, "pod_name": pod}
	} else {
		netns, ifn := os.Getenv("CNI_NETNS"), "eth0"
		if v, set := os.LookupEnv("CNI_IFNAME"); set {
			ifn = v
		}
		if !utf8.ValidString(cid) || !utf8.ValidString(netns) || !utf8.ValidString(ifn) {
			return r, false
		}
		r.path = "/v1/cni/del"
		body = map[string]string{"container_id": cid, "netns": netns, "ifname": ifn, "network": name}
	}
	raw, err := json.Marshal(body)
	if err != nil {
		return r, false
	}
	r.body = raw
	return r, true
}

// call sends the request and maps the answer as plugin._call and
// apiclient.AgentClient.request do: the ADD result (or nil for DEL), or the
// CNI error.
func call(conn net.Conn, r request) ([]byte, *cniError) {
	unreachable := func(err error) *cniError {
		return &cniError{errTryAgain, "the axoneme agent is not reachable",
			fmt.Sprintf("cannot reach the agent at %s (start it with: axoneme agent run): no answer: %v",
				r.socket, err)}
	}
	conn.SetDeadline(time.Now().Add(timeout))
	head := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"+
		"Content-Length: %d\r\nConnection: close\r\n\r\n", r.path, len(r.body))
	if _, err := conn.Write(append([]byte(head), r.body...)); err != nil {
		return nil, unreachable(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return nil, unreachable(err)
	}
	raw, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, unreachable(err)
	}
	var obj map[string]json.RawMessage
	isJSON := strings.Contains(resp.Header.Get("Content-Type"), "json")
	if isJSON && len(raw) > 0 {
		if json.Unmarshal(raw, &obj) != nil {
			obj = nil
		}
	}
	if resp.StatusCode >= 400 {
		msg := strings.ToValidUTF8(string(raw), "\uFFFD")
		if isJSON && len(raw) == 0 {
			msg = "None"
		}
		if obj != nil {
			if e, has := obj["error"]; has {
				var s string
				if json.Unmarshal(e, &s) == nil {
					msg = s
				} else {
					msg = string(e)
				}
			}
		}
		code := errAgent
		switch resp.StatusCode {
		case 409:
			code = errInvalidEnv // the container id already has an attachment
		case 404:
			code = errUnknownCtr
		case 503:
			code = errTryAgain // not possible yet
		}
		return nil, &cniError{code, "the axoneme agent refused the request", msg}
	}
	if r.path != "/v1/cni/add" {
		return nil, nil
	}
	field := func(name, empty string) string {
		if v, has := obj[name]; has {
			return string(v)
		}
		return empty
	}
	version, _ := json.Marshal(r.version)
	out := fmt.Sprintf(`{"cniVersion": %s, "interfaces": %s, "ips": %s, "routes": %s, "dns": %s}`,
		version, field("interfaces", "[]"), field("ips", "[]"), field("routes", "[]"),
		field("dns", "{}"))
	return []byte(out), nil
}

// fail prints the CNI error result and exits 1 (plugin.run's except branch).
func fail(command, version string, e *cniError) {
	res := map[string]any{"cniVersion": version, "code": e.code, "msg": e.msg}
	if e.details != "" {
		res["details"] = e.details
	}
	out, _ := json.Marshal(res)
	os.Stdout.Write(out)
	fmt.Fprintf(os.Stderr, "axoneme-cni %s: %s: %s\n", command, e.msg, e.details)
	os.Exit(1)
}

// handOver execs the Python plugin with the same environment; stdin, when
// already read, is given to it again from an unlinked temporary file.
func handOver(stdin []byte) {
	if stdin != nil {
		f, err := os.CreateTemp("", "axoneme-cni-")
		if err == nil {
			os.Remove(f.Name())
			_, err = f.Write(stdin)
		}
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err == nil {
			err = syscall.Dup3(int(f.Fd()), 0, 0)
		}
		if err != nil {
			fail(os.Getenv("CNI_COMMAND"), "1.1.0", &cniError{errIO, "cannot hand the request to the plugin",
				err.Error()})
		}
	}
	plugin := fallback
	if p := os.Getenv("AXONEME_CNI_FALLBACK"); p != "" {
		plugin = p // tests: prove which path answered
	} else if plugin == "" {
		self, err := os.Executable()
		if err != nil {
			fail(os.Getenv("CNI_COMMAND"), "1.1.0", &cniError{errIO, "cannot find the plugin",
				err.Error()})
		}
		plugin = filepath.Join(filepath.Dir(self), siblingFallback)
	}
	err := syscall.Exec(plugin, []string{plugin}, os.Environ())
	fail(os.Getenv("CNI_COMMAND"), "1.1.0", &cniError{errIO, "cannot run the plugin",
		fmt.Sprintf("%s: %v", plugin, err)})
}
