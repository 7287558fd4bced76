// Command demoserver is the sample application of `make demo`: an HTTP
// server that answers every request with its name, so the demo can show
// which endpoint a request reached; GET /xfcc answers the request's
// x-forwarded-client-cert instead, so the demo can show the identity a
// sidecar terminating mTLS passed on to the application.
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
			if r.URL.Path == "/xfcc" {
				fmt.Fprintf(w, "%s\n", r.Header.Get("X-Forwarded-Client-Cert"))
				return
			}
			fmt.Fprintf(w, "%s\n", *name)
		}),
	}
	log.Fatal(srv.ListenAndServe())
}
