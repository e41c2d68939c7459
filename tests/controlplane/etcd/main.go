// Command etcd is etcd's own server main, built from the Go module proxy so the
// test bed needs no prebuilt binary from outside the registries it can reach.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
