// grpcfloor: the Go client of hack/grpc-floor (kubelet and critest are grpc-go clients). It sends
// `-calls` CRI calls back to back on one connection, after `-warmup` untimed ones, each with its
// own deadline as kubelet's and critest's clients do, and prints each call's wall time in ms,
// one per line. Built against a cri-tools checkout's vendor tree, offline: hack/bench.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	socket := flag.String("socket", "", "unix socket path")
	method := flag.String("method", "version", "version | imagestatus")
	image := flag.String("image", "", "image for imagestatus")
	calls := flag.Int("calls", 200, "timed calls")
	warmup := flag.Int("warmup", 20, "untimed calls first")
	flag.Parse()

	conn, err := grpc.NewClient("unix://"+*socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16*1024*1024)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(2)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	im := runtimeapi.NewImageServiceClient(conn)

	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		switch *method {
		case "version":
			_, err = rt.Version(ctx, &runtimeapi.VersionRequest{})
		case "imagestatus":
			_, err = im.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{
				Image: &runtimeapi.ImageSpec{Image: *image}})
		default:
			err = fmt.Errorf("unknown method %q", *method)
		}
		return err
	}
	for i := 0; i < *warmup; i++ {
		if err := call(); err != nil {
			fmt.Fprintln(os.Stderr, "warmup:", err)
			os.Exit(1)
		}
	}
	samples := make([]time.Duration, 0, *calls)
	for i := 0; i < *calls; i++ {
		start := time.Now()
		if err := call(); err != nil {
			fmt.Fprintln(os.Stderr, "call:", err)
			os.Exit(1)
		}
		samples = append(samples, time.Since(start))
	}
	for _, s := range samples {
		fmt.Printf("%.4f\n", float64(s.Nanoseconds())/1e6)
	}
}
