// Command peer-go is the Go side of `make bench`'s peers phase: the clients
// a team would pick instead of meshkit's (go-zero's zrpc with its etcd
// discovery, grpc-go with round_robin), driving the same load as the Rust
// side (`peer-client`), and a grpc-go echo server for the server comparison.
// deploy/local/install-deps.sh --bench builds it into target/tools/peer-go.
//
//	peer-go client --client gozero|grpcgo [--etcd HOST:PORT --key KEY]
//	    [--addrs A,B,C] [--rate 2000 | --concurrency 64] [--seconds 5]
//	    [--warmup-seconds 1] [--deadline-ms 1000]
//	peer-go serve --listen 127.0.0.1:PORT
//
// The client calls meshkit.echo.v1.EchoService/Echo: open loop at --rate
// (each call on its own goroutine, a slow call holds back none), or closed
// loop with --concurrency callers back to back. It prints
// {"event":"measuring"} when the warm-up ends and the measured run begins,
// then one summary line: calls, failures by code, and the latency
// quantiles, in µs (nearest rank), of every call started in the measured
// --seconds, failed ones included; then it stays until its stdin closes, so
// the caller can read its CPU time.
//
// go-zero's client runs with the defaults its configuration loader gives
// (p2c_ewma, and the trace, duration, prometheus, breaker and timeout
// interceptors on), its logs off. Neither client retries a call that
// reached a server; grpc-go retries, transparently, one that never left.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeromicro/go-zero/core/conf"
	"github.com/zeromicro/go-zero/core/logx"
	"github.com/zeromicro/go-zero/zrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	service = "meshkit.echo.v1.EchoService"
	method  = "/" + service + "/Echo"
	// maxInFlight bounds the open loop's goroutines: a call beyond it is
	// counted as failed (RESOURCE_EXHAUSTED) rather than started.
	maxInFlight = 20000
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

var _ encoding.CodecV2 = rawCodec{}

// codeNames are the status code names of the gRPC spec.
var codeNames = [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return strconv.Itoa(int(c))
}

// echoRequest is EchoRequest{text: "bench"}, encoded.
func echoRequest() []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendString(b, "bench")
}

type summary struct {
	Event   string         `json:"event"`
	Calls   int            `json:"calls"`
	Failed  int            `json:"failed"`
	ByCode  map[string]int `json:"by_code"`
	Seconds float64        `json:"seconds"`
	P50     int64          `json:"p50_us"`
	P99     int64          `json:"p99_us"`
	P999    int64          `json:"p999_us"`
	Max     int64          `json:"max_us"`
}

// quantile is the nearest-rank quantile of sorted values.
func quantile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	if rank < 0 {
		rank = 0
	}
	return sorted[rank]
}

// recorder keeps the latency and code of every call started in the
// measured window [from, until).
type recorder struct {
	from, until time.Time
	mu          sync.Mutex
	latencies   []int64
	byCode      map[string]int
}

func (r *recorder) record(start time.Time, took time.Duration, code codes.Code) {
	if start.Before(r.from) || !start.Before(r.until) {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.latencies = append(r.latencies, took.Microseconds())
	if code != codes.OK {
		r.byCode[codeName(code)]++
	}
}

func (r *recorder) summary(seconds float64) summary {
	r.mu.Lock()
	defer r.mu.Unlock()
	sort.Slice(r.latencies, func(i, j int) bool { return r.latencies[i] < r.latencies[j] })
	failed := 0
	for _, n := range r.byCode {
		failed += n
	}
	s := summary{Event: "summary", Calls: len(r.latencies), Failed: failed, ByCode: r.byCode, Seconds: seconds,
		P50: quantile(r.latencies, 0.50), P99: quantile(r.latencies, 0.99), P999: quantile(r.latencies, 0.999)}
	if n := len(r.latencies); n > 0 {
		s.Max = r.latencies[n-1]
	}
	return s
}

func dial(client, etcd, key string, addrs []string, deadline time.Duration) (*grpc.ClientConn, error) {
	codec := grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{}))
	switch client {
	case "gozero":
		var c zrpc.RpcClientConf
		if err := conf.FillDefault(&c); err != nil {
			return nil, err
		}
		c.Etcd.Hosts = []string{etcd}
		c.Etcd.Key = key
		c.Timeout = deadline.Milliseconds()
		cli, err := zrpc.NewClient(c, zrpc.WithDialOption(codec))
		if err != nil {
			return nil, err
		}
		return cli.Conn(), nil
	case "grpcgo":
		r := manual.NewBuilderWithScheme("peers")
		state := resolver.State{}
		for _, a := range addrs {
			state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
		}
		r.InitialState(state)
		return grpc.NewClient(r.Scheme()+":///echo", grpc.WithResolvers(r), codec,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`))
	}
	return nil, fmt.Errorf("--client must be gozero or grpcgo, not %q", client)
}

func runClient(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	client := fs.String("client", "", "gozero or grpcgo")
	etcd := fs.String("etcd", "", "etcd endpoint (gozero)")
	key := fs.String("key", "echo.rpc", "go-zero's discovery key (gozero)")
	addrs := fs.String("addrs", "", "comma-separated backend addresses (grpcgo)")
	rate := fs.Int("rate", 2000, "calls per second, open loop")
	concurrency := fs.Int("concurrency", 0, "callers back to back instead of --rate")
	seconds := fs.Float64("seconds", 5, "measured seconds")
	warmup := fs.Float64("warmup-seconds", 1, "unmeasured seconds first")
	deadlineMs := fs.Int("deadline-ms", 1000, "per-call deadline")
	if err := fs.Parse(args); err != nil {
		return err
	}
	logx.Disable()
	deadline := time.Duration(*deadlineMs) * time.Millisecond
	conn, err := dial(*client, *etcd, *key, strings.Split(*addrs, ","), deadline)
	if err != nil {
		return err
	}
	defer conn.Close()
	request := echoRequest()
	started := time.Now()
	measureAt := started.Add(time.Duration(*warmup * float64(time.Second)))
	stop := measureAt.Add(time.Duration(*seconds * float64(time.Second)))
	rec := &recorder{from: measureAt, until: stop, byCode: map[string]int{}}
	call := func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		var reply []byte
		start := time.Now()
		err := conn.Invoke(ctx, method, &request, &reply)
		rec.record(start, time.Since(start), status.Code(err))
	}
	out := json.NewEncoder(os.Stdout)
	var wg sync.WaitGroup
	measuring := false
	startMeasuring := func() {
		measuring = true
		_ = out.Encode(map[string]string{"event": "measuring"})
	}
	if *concurrency > 0 {
		for i := 0; i < *concurrency; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					call()
				}
			}()
		}
		time.Sleep(time.Until(measureAt))
		startMeasuring()
	} else {
		var inFlight atomic.Int64
		interval := time.Second / time.Duration(*rate)
		next := started
		for {
			if !measuring && !next.Before(measureAt) {
				startMeasuring()
			}
			if !next.Before(stop) {
				break
			}
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			next = next.Add(interval)
			if inFlight.Load() >= maxInFlight {
				rec.record(time.Now(), 0, codes.ResourceExhausted)
				continue
			}
			inFlight.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer inFlight.Add(-1)
				call()
			}()
		}
	}
	wg.Wait()
	if err := out.Encode(rec.summary(*seconds)); err != nil {
		return err
	}
	// Stay until stdin closes, so the caller can read this process's CPU time.
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// echoReply is EchoReply{request, served_by: "grpc-go", count: 1}.
func echoReply(request []byte) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, request)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendString(b, "grpc-go")
	b = protowire.AppendTag(b, 3, protowire.VarintType)
	return protowire.AppendVarint(b, 1)
}

func echoHandler(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	var request []byte
	if err := dec(&request); err != nil {
		return nil, err
	}
	reply := echoReply(request)
	return &reply, nil
}

func runServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to serve on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	s := grpc.NewServer(grpc.ForceServerCodecV2(rawCodec{}))
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: service,
		HandlerType: (*any)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Echo", Handler: echoHandler}},
	}, struct{}{})
	return s.Serve(lis)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: peer-go client|serve [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "client":
		err = runClient(os.Args[2:])
	case "serve":
		err = runServe(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: client or serve", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "peer-go: %v\n", err)
		os.Exit(1)
	}
}
