// Command demoserver is the sample application of `make demo`: an HTTP
// server that answers every request with its name, so the demo can show
// which endpoint a request reached.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"
)

func main() {
	name := flag.String("name", "", "what the server answers (required)")
	addr := flag.String("listen", "", "address to listen on, host:port (required)")
	flag.Parse()
	if *name == "" || *addr == "" {
		fmt.Fprintln(os.Stderr, "usage: demoserver --name NAME --listen HOST:PORT")
		os.Exit(2)
	}
	srv := &http.Server{
		Addr:              *addr,
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s\n", *name)
		}),
	}
	log.Fatal(srv.ListenAndServe())
}
