// Command weightsync-client calls a weightsync rollout from Go: it reads WeightSync.GetStatus,
// then calls Generate.Generate.
//
//	weightsync-client [-max-tokens N] [-logprobs] [-timeout DURATION] [-token-file FILE] ADDRESS PROMPT
//
// With -logprobs the request sets logprobs: true and the response carries one logprob per token id.
// With -token-file (or WEIGHTSYNC_AUTH_TOKEN), every call carries "authorization: Bearer <token>",
// for a rollout started with --auth-token-file (and --generate-token-file holding the same token).
// The stubs are generated from proto/ by protoc-gen-go and protoc-gen-go-grpc (`make go-client`).
// Prints one JSON object in the protobuf JSON mapping with proto field names (uint64 as strings):
//
//	{"status": GetStatusResponse, "response": GenerateResponse}          exit 0
//	{"status": GetStatusResponse, "error": {"code", "name", "details", "reason", "domain"}}
//	                                      exit 1 (e.g. UNAVAILABLE, reason NO_WEIGHTS, before the first commit)
//
// "reason" is the google.rpc.ErrorInfo the rollout puts in the status details (domain "weightsync.v1"):
// branch on it, never on "details" text.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
	"unicode"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	weightsyncv1 "github.com/weightsync/weightsync/gen/go/weightsync/v1"
)

// rpcError is a gRPC status as the client prints it.
type rpcError struct {
	Code    uint32 `json:"code"`
	Name    string `json:"name"`
	Details string `json:"details"`
	Reason  string `json:"reason"`
	Domain  string `json:"domain"`
}

// errorOf is the status as printed, with the reason from its ErrorInfo detail when there is one.
func errorOf(s *status.Status) rpcError {
	out := rpcError{Code: uint32(s.Code()), Name: codeName(s.Code().String()), Details: s.Message()}
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			out.Reason, out.Domain = info.GetReason(), info.GetDomain()
			break
		}
	}
	return out
}

// codeName spells a status code as the gRPC spec does ("FailedPrecondition" -> "FAILED_PRECONDITION").
func codeName(camel string) string {
	if camel == "OK" {
		return camel
	}
	var b strings.Builder
	for i, r := range camel {
		if i > 0 && unicode.IsUpper(r) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

func main() {
	maxTokens := flag.Uint("max-tokens", 16, "upper bound on generated tokens")
	logprobs := flag.Bool("logprobs", false, "also return the logprob of each generated token")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of each call")
	tokenFile := flag.String("token-file", "", "file holding the bearer token (default: $WEIGHTSYNC_AUTH_TOKEN)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: weightsync-client [-max-tokens N] [-logprobs] [-timeout DURATION] [-token-file FILE] ADDRESS PROMPT")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	address, prompt := flag.Arg(0), flag.Arg(1)
	token := os.Getenv("WEIGHTSYNC_AUTH_TOKEN")
	if *tokenFile != "" {
		raw, err := os.ReadFile(*tokenFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		token = strings.TrimSpace(string(raw))
	}
	callContext := func() (context.Context, context.CancelFunc) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		if token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		return ctx, cancel
	}

	conn, err := grpc.Dial(address, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()

	out := map[string]interface{}{}
	marshal := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}
	put := func(key string, message proto.Message) {
		raw, err := marshal.Marshal(message)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		out[key] = json.RawMessage(raw)
	}

	exitCode := 0
	err = func() error {
		ctx, cancel := callContext()
		defer cancel()
		st, err := weightsyncv1.NewWeightSyncClient(conn).GetStatus(ctx, &weightsyncv1.GetStatusRequest{})
		if err != nil {
			return err
		}
		put("status", st)

		ctx, cancel = callContext()
		defer cancel()
		response, err := weightsyncv1.NewGenerateClient(conn).Generate(ctx, &weightsyncv1.GenerateRequest{
			Prompt:    prompt,
			MaxTokens: uint32(*maxTokens),
			Logprobs:  *logprobs,
		})
		if err != nil {
			return err
		}
		put("response", response)
		return nil
	}()
	if err != nil {
		s, ok := status.FromError(err)
		if !ok {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		out["error"] = errorOf(s)
		exitCode = 1
	}
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(line))
	os.Exit(exitCode)
}
