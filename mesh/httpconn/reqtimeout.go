package httpconn

import (
	"context"
	"net/http"
	"time"
)

// requestTimedOut is request_timeout firing: the whole request has not
// arrived in time. Cancelling the stream is not enough while the router
// is blocked reading the rest of the body from the client (the upstream
// write runs on the stream's goroutine), so the downstream read deadline
// is moved to now as well: the read fails, the stream answers 408 and,
// for HTTP/1.1, the connection closes (its unread body is in the way),
// as in Envoy. The deadline is only touched when this timer's cause won:
// a stream that finished first cancelled with its own cause.
func requestTimedOut(ctx context.Context, cancel context.CancelCauseFunc, w http.ResponseWriter) {
	cancel(errRequestTimeout)
	if context.Cause(ctx) != errRequestTimeout {
		return
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Now())
}
