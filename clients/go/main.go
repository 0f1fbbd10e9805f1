// A small grpc-go client of the public API, built by clients/check against
// the stubs protoc-gen-go and protoc-gen-go-grpc generated from
// proto/betting/v1: it reads a player's wallet with a gzip-compressed
// request and prints the balance.
//
//	client ADDRESS TOKEN
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	bettingv1 "github.com/p2p-betting/betting/gen/go/betting/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: client ADDRESS TOKEN")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Debian's grpc-go (1.33) predates credentials/insecure.
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+os.Args[2])
	response, err := bettingv1.NewWalletServiceClient(conn).GetWallet(
		ctx, &bettingv1.GetWalletRequest{}, grpc.UseCompressor(gzip.Name))
	if err != nil {
		fmt.Fprintln(os.Stderr, "GetWallet:", err)
		os.Exit(1)
	}
	fmt.Println(response.GetWallet().GetBalance())
}
