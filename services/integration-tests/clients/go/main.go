// Command xds-client-go is grpc-go's xDS client of meshkit for the xDS
// integration tests: it resolves an xds:/// target through the management
// server named by $GRPC_XDS_BOOTSTRAP and calls UserService/GetUser open
// loop at a fixed rate, printing one JSON line per call and a summary. Its
// flags and output are those of io.meshkit.xds.Client (grpc-java), so a test
// can drive either. deploy/local/install-deps.sh --test builds it into
// target/tools/xds-client-go.
//
//	xds-client-go --user-id ID [--target xds:///meshkit.user.v1.UserService]
//	    [--rate 100] [--seconds 10 (0: until stdin ends)] [--deadline-ms 2000]
//	    [--ready-timeout-ms 0 (0: call at once)]
//
// With --ready-timeout-ms the calls start once the channel is READY (xDS
// resolved and one backend connected), so a cold start is not counted as
// failed calls; the wait is printed as {"event":"ready","ms":…}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	_ "google.golang.org/grpc/xds" // the xds resolver and balancers
)

const (
	method      = "/meshkit.user.v1.UserService/GetUser"
	maxInFlight = 256
)

// rawCodec sends and receives messages as the bytes they already are; it is
// named "proto" so the content type stays application/grpc+proto.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

// codeNames are the status code names of the gRPC spec (codes.Code.String
// spells them differently).
var codeNames = [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return strconv.Itoa(int(c))
}

// fixed is a float written with a fixed number of decimals.
type fixed struct {
	v    float64
	prec int
}

func (f fixed) MarshalJSON() ([]byte, error) {
	return strconv.AppendFloat(nil, f.v, 'f', f.prec, 64), nil
}

type callLine struct {
	T        fixed  `json:"t"`
	Ms       fixed  `json:"ms"`
	Code     string `json:"code"`
	Instance string `json:"instance"`
	Msg      string `json:"msg"`
}

type endLine struct {
	Event      string         `json:"event"`
	Calls      int            `json:"calls"`
	OK         int            `json:"ok"`
	ByInstance map[string]int `json:"by_instance"`
	ByCode     map[string]int `json:"by_code"`
}

// printer writes whole JSON lines to stdout, one at a time, and keeps the tally.
type printer struct {
	mu         sync.Mutex
	enc        *json.Encoder
	calls, ok  int
	byInstance map[string]int
	byCode     map[string]int
}

func (p *printer) emit(v any) {
	if err := p.enc.Encode(v); err != nil {
		fmt.Fprintf(os.Stderr, "xds-client-go: writing stdout: %v\n", err)
	}
}

func (p *printer) call(l callLine) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls++
	if l.Code == "OK" {
		p.ok++
	}
	if l.Instance != "" {
		p.byInstance[l.Instance]++
	}
	p.byCode[l.Code]++
	p.emit(l)
}

func firstValue(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func main() {
	target := flag.String("target", "xds:///meshkit.user.v1.UserService", "the channel's target")
	userID := flag.String("user-id", "", "GetUserRequest.id (required)")
	rate := flag.Float64("rate", 100, "calls started per second")
	seconds := flag.Float64("seconds", 10, "how long to start calls; 0: until stdin reaches EOF")
	deadlineMs := flag.Int("deadline-ms", 2000, "each call's deadline in milliseconds")
	readyMs := flag.Int("ready-timeout-ms", 0, "wait up to this long for the channel to be READY before calling; 0: do not wait")
	flag.Parse()
	fail := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "xds-client-go: "+format+"\n", a...)
		os.Exit(2)
	}
	switch {
	case flag.NArg() > 0:
		fail("unexpected argument %q", flag.Arg(0))
	case *userID == "":
		fail("--user-id is required")
	case *rate <= 0:
		fail("--rate must be positive")
	case *seconds < 0:
		fail("--seconds must not be negative")
	case *deadlineMs <= 0:
		fail("--deadline-ms must be positive")
	case *readyMs < 0:
		fail("--ready-timeout-ms must not be negative")
	}
	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("grpc.NewClient(%q): %v", *target, err)
	}
	defer conn.Close()

	enc := json.NewEncoder(os.Stdout) // os.Stdout is unbuffered: each line is written whole
	enc.SetEscapeHTML(false)
	out := &printer{enc: enc, byInstance: map[string]int{}, byCode: map[string]int{}}
	request := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), *userID)
	deadline := time.Duration(*deadlineMs) * time.Millisecond

	var stdinEOF chan struct{} // with --seconds 0, closed when stdin ends; else nil, never ready
	if *seconds == 0 {
		stdinEOF = make(chan struct{})
		go func() { io.Copy(io.Discard, os.Stdin); close(stdinEOF) }()
	}
	if *readyMs > 0 {
		waited := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*readyMs)*time.Millisecond)
		conn.Connect()
		for state := conn.GetState(); state != connectivity.Ready; state = conn.GetState() {
			if !conn.WaitForStateChange(ctx, state) {
				fail("the channel to %q is not READY after %d ms (last state %v)", *target, *readyMs, state)
			}
		}
		cancel()
		out.emit(map[string]any{"event": "ready", "ms": fixed{float64(time.Since(waited).Microseconds()) / 1000, 1}})
	}
	out.emit(map[string]string{"event": "start"})
	start := time.Now()
	sinceStart := func(t time.Time) fixed { return fixed{float64(t.Sub(start).Microseconds()) / 1000, 1} }
	slots := make(chan struct{}, maxInFlight)
	var wg sync.WaitGroup
	call := func(called time.Time) {
		defer func() { <-slots; wg.Done() }()
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		var response []byte
		var header, trailer metadata.MD
		err := conn.Invoke(ctx, method, &request, &response, grpc.ForceCodecV2(rawCodec{}),
			grpc.Header(&header), grpc.Trailer(&trailer))
		latency := float64(time.Since(called).Microseconds()) / 1000
		st := status.Convert(err)
		instance := firstValue(header, "x-meshkit-instance")
		if instance == "" { // a trailers-only answer (an error) carries it in the trailers
			instance = firstValue(trailer, "x-meshkit-instance")
		}
		out.call(callLine{T: sinceStart(called), Ms: fixed{latency, 3}, Code: codeName(st.Code()),
			Instance: instance, Msg: st.Message()})
	}
	// Open loop: call i starts at i/rate seconds, however many are still running.
	end := time.Duration(*seconds * float64(time.Second))
loop:
	for i := 0; ; i++ {
		at := time.Duration(float64(i) * float64(time.Second) / *rate)
		if *seconds > 0 && at >= end {
			break
		}
		timer := time.NewTimer(time.Until(start.Add(at)))
		select {
		case <-stdinEOF:
			timer.Stop()
			break loop
		case <-timer.C:
		}
		called := time.Now()
		select {
		case slots <- struct{}{}:
			wg.Add(1)
			go call(called)
		default:
			out.call(callLine{T: sinceStart(called), Ms: fixed{0, 3}, Code: "SKIPPED",
				Msg: strconv.Itoa(maxInFlight) + " calls in flight"})
		}
	}
	wg.Wait()
	out.mu.Lock()
	out.emit(endLine{Event: "end", Calls: out.calls, OK: out.ok, ByInstance: out.byInstance, ByCode: out.byCode})
	out.mu.Unlock()
}
