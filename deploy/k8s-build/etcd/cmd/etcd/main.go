// The etcd server, as upstream's go.etcd.io/etcd/v3 main package builds it
// (that root module is not on the module proxy, so this is its one-line twin).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
