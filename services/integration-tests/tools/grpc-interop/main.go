// Command grpc-interop runs one of grpc-go's interop test cases (the
// functions of google.golang.org/grpc/interop, which hold every assertion)
// against a server. Its flags are those of grpc-go's interop/client, plus
// -cert_file and -key_file: a meshkit server with TLS on requires a client
// certificate, which the stock client cannot present. It exits non-zero,
// naming what differed, when a case fails.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"log"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

var (
	serverHost     = flag.String("server_host", "127.0.0.1", "The server host name")
	serverPort     = flag.Int("server_port", 10000, "The server port number")
	useTLS         = flag.Bool("use_tls", false, "Connection uses TLS if true")
	caFile         = flag.String("ca_file", "", "The file containing the CA root cert file")
	certFile       = flag.String("cert_file", "", "A client certificate (PEM) to present, with -key_file")
	keyFile        = flag.String("key_file", "", "The client certificate's private key (PEM)")
	tlsServerName  = flag.String("server_host_override", "", "The server name to verify in the TLS handshake")
	testCase       = flag.String("test_case", "large_unary", "The test case to run")
	soakIterations = flag.Int("soak_iterations", 10, "Iterations of rpc_soak and channel_soak")
	soakTimeout    = flag.Int("soak_overall_timeout_seconds", 10, "Overall limit of a soak case")
)

func credentialsFromFlags() grpc.DialOption {
	if !*useTLS {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	config := &tls.Config{ServerName: *tlsServerName}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			log.Fatalf("reading -ca_file: %v", err)
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			log.Fatalf("-ca_file %s holds no certificate", *caFile)
		}
	}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("reading -cert_file/-key_file: %v", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config))
}

func main() {
	flag.Parse()
	addr := net.JoinHostPort(*serverHost, strconv.Itoa(*serverPort))
	creds := credentialsFromFlags()
	conn, err := grpc.NewClient(addr, creds)
	if err != nil {
		log.Fatalf("grpc.NewClient(%q): %v", addr, err)
	}
	defer conn.Close()
	tc := testgrpc.NewTestServiceClient(conn)
	ctx := context.Background()
	soak := func(channel func() (*grpc.ClientConn, func())) {
		deadline, cancel := context.WithTimeout(ctx, time.Duration(*soakTimeout)*time.Second)
		defer cancel()
		interop.DoSoakTest(deadline, interop.SoakTestConfig{
			RequestSize:                      271828,
			ResponseSize:                     314159,
			PerIterationMaxAcceptableLatency: time.Second,
			OverallTimeout:                   time.Duration(*soakTimeout) * time.Second,
			ServerAddr:                       addr,
			NumWorkers:                       1,
			Iterations:                       *soakIterations,
			ChannelForTest:                   channel,
		})
	}
	switch *testCase {
	case "empty_unary":
		interop.DoEmptyUnaryCall(ctx, tc)
	case "large_unary":
		interop.DoLargeUnaryCall(ctx, tc)
	case "client_streaming":
		interop.DoClientStreaming(ctx, tc)
	case "server_streaming":
		interop.DoServerStreaming(ctx, tc)
	case "ping_pong":
		interop.DoPingPong(ctx, tc)
	case "empty_stream":
		interop.DoEmptyStream(ctx, tc)
	case "timeout_on_sleeping_server":
		interop.DoTimeoutOnSleepingServer(ctx, tc)
	case "cancel_after_begin":
		interop.DoCancelAfterBegin(ctx, tc)
	case "cancel_after_first_response":
		interop.DoCancelAfterFirstResponse(ctx, tc)
	case "status_code_and_message":
		interop.DoStatusCodeAndMessage(ctx, tc)
	case "special_status_message":
		interop.DoSpecialStatusMessage(ctx, tc)
	case "custom_metadata":
		interop.DoCustomMetadata(ctx, tc)
	case "unimplemented_method":
		interop.DoUnimplementedMethod(ctx, conn)
	case "unimplemented_service":
		interop.DoUnimplementedService(ctx, testgrpc.NewUnimplementedServiceClient(conn))
	case "pick_first_unary":
		interop.DoPickFirstUnary(ctx, tc)
	case "rpc_soak":
		soak(func() (*grpc.ClientConn, func()) { return conn, func() {} })
	case "channel_soak":
		soak(func() (*grpc.ClientConn, func()) {
			cc, err := grpc.NewClient(addr, creds)
			if err != nil {
				log.Fatalf("grpc.NewClient(%q): %v", addr, err)
			}
			return cc, func() { cc.Close() }
		})
	default:
		log.Fatalf("unknown -test_case %q", *testCase)
	}
	log.Printf("%s passed", *testCase)
}
