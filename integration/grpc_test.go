//go:build linux

package integration

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// echoService is grpc.testing.TestService reduced to what the test
// needs: unary echo (with the status the request asks for), server
// streaming that sends its headers and then waits for the test before
// each message, client streaming that adds up sizes, bidirectional
// echo, and a unary call that holds until released (for timeouts).
type echoService struct {
	testpb.UnimplementedTestServiceServer
	step     chan struct{}
	deadline chan time.Duration // the remaining deadline a held call saw
}

func (e *echoService) UnaryCall(ctx context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	if st := in.GetResponseStatus(); st != nil {
		return nil, status.Error(codes.Code(st.GetCode()), st.GetMessage())
	}
	if in.GetFillUsername() { // "hold": wait, ignoring the call's own deadline
		dl, ok := ctx.Deadline()
		rem := time.Duration(-1)
		if ok {
			rem = time.Until(dl)
		}
		e.deadline <- rem
		<-e.step
		return &testpb.SimpleResponse{}, nil
	}
	return &testpb.SimpleResponse{Payload: in.GetPayload()}, nil
}

func (e *echoService) StreamingOutputCall(in *testpb.StreamingOutputCallRequest, s grpc.ServerStreamingServer[testpb.StreamingOutputCallResponse]) error {
	if err := s.SendHeader(metadata.Pairs("x-stream", "head-first")); err != nil {
		return err
	}
	for _, p := range in.GetResponseParameters() {
		select {
		case <-e.step:
		case <-s.Context().Done():
			return s.Context().Err()
		}
		body := make([]byte, p.GetSize())
		if err := s.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: body}}); err != nil {
			return err
		}
	}
	s.SetTrailer(metadata.Pairs("x-trailer", "done"))
	return nil
}

func (e *echoService) StreamingInputCall(s grpc.ClientStreamingServer[testpb.StreamingInputCallRequest, testpb.StreamingInputCallResponse]) error {
	var total int32
	for {
		in, err := s.Recv()
		if err == io.EOF {
			return s.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		total += int32(len(in.GetPayload().GetBody()))
	}
}

func (e *echoService) FullDuplexCall(s grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	for {
		in, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := s.Send(&testpb.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

// TestGRPCThroughSidecar (issue #15 item 12): google.golang.org/grpc's
// client in the pod and server behind Istio's outbound listener, h2c on
// both sides, through capture: the health service (Check, and Watch's
// stream), unary calls with their grpc-status (OK and an error with its
// message), server streaming whose headers reach the client before the
// first message is sent, client streaming, bidirectional streaming in
// lock step (each reply before the next request), trailers passed. The
// route's max_grpc_timeout caps the call's grpc-timeout: a call with a 10 s
// deadline to a server that never answers ends after the route's 300 ms
// with the proxy's UNAVAILABLE "upstream request timeout", and the server
// saw a deadline no longer than the cap (the grpc-timeout the proxy sent).
func TestGRPCThroughSidecar(t *testing.T) {
	requireRoot(t)
	echo := &echoService{step: make(chan struct{}), deadline: make(chan time.Duration, 1)}
	hs := health.NewServer()
	hs.SetServingStatus("grpc.testing.TestService", healthpb.HealthCheckResponse_SERVING)
	s := startStreamServer(t, func(ln net.Listener) func() {
		srv := grpc.NewServer()
		testpb.RegisterTestServiceServer(srv, echo)
		healthpb.RegisterHealthServer(srv, hs)
		go srv.Serve(ln)
		return srv.Stop
	}, true, nil, obj{
		"max_grpc_timeout": "0.300s",
		// Istio's retry policy for a service route.
		"retry_policy": obj{"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", "num_retries": 2},
	})
	conn, err := grpc.NewClient("passthrough:///"+s.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority(s.host),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return s.dialPod(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Health: Check, and Watch's first status on its stream.
	hc := healthpb.NewHealthClient(conn)
	if r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "grpc.testing.TestService"}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health Check: %v %v", r, err)
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("health Check of an unknown service: %v, want NotFound", err)
	}
	wctx, wcancel := context.WithCancel(ctx)
	w, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{Service: "grpc.testing.TestService"})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health Watch: %v %v", r, err)
	}
	hs.SetServingStatus("grpc.testing.TestService", healthpb.HealthCheckResponse_NOT_SERVING)
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health Watch after the change: %v %v", r, err)
	}
	wcancel()

	tc := testpb.NewTestServiceClient(conn)
	// Unary: OK, and an error status with its message (grpc-status and
	// grpc-message as trailers).
	body := []byte(strings.Repeat("u", 100<<10))
	if r, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{Payload: &testpb.Payload{Body: body}}); err != nil || len(r.GetPayload().GetBody()) != len(body) {
		t.Fatalf("unary: %d bytes, %v", len(r.GetPayload().GetBody()), err)
	}
	_, err = tc.UnaryCall(ctx, &testpb.SimpleRequest{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "not now"}})
	if st, _ := status.FromError(err); st.Code() != codes.FailedPrecondition || st.Message() != "not now" {
		t.Errorf("unary error: %v, want FailedPrecondition \"not now\"", err)
	}

	// Server streaming: headers first, each message on the test's step.
	ss, err := tc.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: 10}, {Size: 20}, {Size: 30}}})
	if err != nil {
		t.Fatal(err)
	}
	hdone := make(chan metadata.MD, 1)
	go func() {
		md, _ := ss.Header()
		hdone <- md
	}()
	select {
	case md := <-hdone:
		if got := md.Get("x-stream"); len(got) != 1 || got[0] != "head-first" {
			t.Errorf("server streaming headers: %v", md)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server streaming: the headers stalled while the server waited to send its first message")
	}
	for _, n := range []int{10, 20, 30} {
		echo.step <- struct{}{}
		r, err := ss.Recv()
		if err != nil || len(r.GetPayload().GetBody()) != n {
			t.Fatalf("server streaming message of %d: %v", n, err)
		}
	}
	if _, err := ss.Recv(); err != io.EOF {
		t.Fatalf("server streaming end: %v", err)
	}
	if tr := ss.Trailer(); len(tr.Get("x-trailer")) != 1 || tr.Get("x-trailer")[0] != "done" {
		t.Errorf("server streaming trailer: %v", tr)
	}

	// Client streaming.
	cs, err := tc.StreamingInputCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 1000, 100000} {
		if err := cs.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: make([]byte, n)}}); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := cs.CloseAndRecv(); err != nil || r.GetAggregatedPayloadSize() != 101001 {
		t.Fatalf("client streaming: %v %v", r, err)
	}

	// Bidirectional, in lock step: a reply must come before the next
	// request is sent.
	bs, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		msg := []byte(strings.Repeat(string(rune('a'+i)), 1+i*1000))
		if err := bs.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: msg}}); err != nil {
			t.Fatal(err)
		}
		r, err := bs.Recv()
		if err != nil || string(r.GetPayload().GetBody()) != string(msg) {
			t.Fatalf("bidi message %d: %v", i, err)
		}
	}
	if err := bs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := bs.Recv(); err != io.EOF {
		t.Fatalf("bidi end: %v", err)
	}

	// grpc-timeout capped by max_grpc_timeout (300 ms): the proxy ends
	// the call, not the client's 10 s deadline.
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := tc.UnaryCall(cctx, &testpb.SimpleRequest{FillUsername: true})
		done <- err
	}()
	var seen time.Duration
	select {
	case seen = <-echo.deadline:
	case <-time.After(5 * time.Second):
		t.Fatal("the held call never reached the server")
	}
	select {
	case err = <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the held call was not ended by the route's max_grpc_timeout")
	}
	close(echo.step)
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable || st.Message() != "upstream request timeout" {
		t.Errorf("held call after %v: %v, want the proxy's UNAVAILABLE \"upstream request timeout\"", time.Since(start), err)
	}
	if seen < 0 || seen > 300*time.Millisecond {
		t.Errorf("the server saw a deadline %v away, want at most the 300ms cap (grpc-timeout rewritten)", seen)
	}
	if _, ok := s.px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.ResponseFlags, "UT") }, 5*time.Second); !ok {
		t.Error("no access line with UT for the capped call")
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("the test ran out of time")
	}
}
