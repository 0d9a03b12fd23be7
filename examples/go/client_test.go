package twinkle

// Which rank a failed fan-out names, and when it stops waiting (docs/protocol.md sections 9
// and 12): the gather rule on its own, fed the ranks' outcomes through a channel.

import (
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func testClient(ranks int, grace time.Duration) *Client {
	client := &Client{options: Options{AbortGrace: grace}.withDefaults()}
	for rank := 0; rank < ranks; rank++ {
		client.Workers = append(client.Workers, &Worker{Rank: rank, Address: "10.0.0." + string(rune('1'+rank)) + ":50051"})
	}
	return client
}

func rankError(t *testing.T, err error) *RankError {
	t.Helper()
	var rankErr *RankError
	if !errors.As(err, &rankErr) {
		t.Fatalf("not a RankError: %v", err)
	}
	return rankErr
}

func TestTheRankThatRefusedIsNamedNotItsAbortedPeers(t *testing.T) {
	client := testClient(3, time.Minute)
	results := make(chan outcome, 3)
	results <- outcome{0, status.Error(codes.Aborted, "not run: rank(s) [2] refused this call")}
	results <- outcome{1, status.Error(codes.Aborted, "not run: rank(s) [2] refused this call")}
	results <- outcome{2, status.Error(codes.InvalidArgument, "rank 2: inputs.input_ids holds token id 300")}
	err := rankError(t, client.gather("ForwardBackward", results))
	if err.Rank != 2 || err.Code != codes.InvalidArgument || err.Others != 2 || len(err.Silent) != 0 {
		t.Fatalf("%+v", err)
	}
	if !strings.Contains(err.Error(), "ForwardBackward failed on rank 2 (10.0.0.3:50051) and 2 other rank(s)") {
		t.Fatalf("message %q", err.Error())
	}
}

func TestAGoneRankIsReportedWithoutWaitingForTheOthers(t *testing.T) {
	client := testClient(2, time.Hour) // the grace would never end: the report must not wait for it
	results := make(chan outcome, 2)
	results <- outcome{1, status.Error(codes.Unavailable, "connection refused")}
	done := make(chan error, 1)
	go func() { done <- client.gather("ClipGradAndStep", results) }()
	select {
	case err := <-done:
		rankErr := rankError(t, err)
		if rankErr.Rank != 1 || rankErr.Code != codes.Unavailable || len(rankErr.Silent) != 0 {
			t.Fatalf("%+v", rankErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("gather waited for rank 0 although rank 1 is gone")
	}
}

func TestARankSilentWhileItsPeersAbortIsNamedAfterTheGrace(t *testing.T) {
	client := testClient(2, 50*time.Millisecond)
	results := make(chan outcome, 2)
	results <- outcome{0, status.Error(codes.Aborted, "a peer rank died or timed out")}
	started := time.Now()
	err := rankError(t, client.gather("ForwardBackward", results))
	if waited := time.Since(started); waited < 50*time.Millisecond {
		t.Fatalf("reported after %v, before the grace", waited)
	}
	if err.Rank != 1 || err.Address != "10.0.0.2:50051" || len(err.Silent) != 1 || err.Silent[0] != 1 {
		t.Fatalf("%+v", err)
	}
	if !strings.Contains(err.Error(), "rank 1 (10.0.0.2:50051) did not answer") || !strings.Contains(err.Error(), "hung or dead") {
		t.Fatalf("message %q", err.Error())
	}
}

func TestAllRanksAnsweringIsNoError(t *testing.T) {
	client := testClient(2, time.Hour)
	results := make(chan outcome, 2)
	results <- outcome{1, nil}
	results <- outcome{0, nil}
	if err := client.gather("Save", results); err != nil {
		t.Fatal(err)
	}
}

func TestInDoubtCallsAreRememberedUntilConfirmed(t *testing.T) {
	w := &Worker{inDoubt: map[uint64]call{}}
	w.record(7, call{method: "Step"}, status.Error(codes.DeadlineExceeded, "deadline"))
	w.record(8, call{method: "Step"}, status.Error(codes.InvalidArgument, "refused")) // an answer: not in doubt
	w.record(0, call{method: "Reset"}, status.Error(codes.Unavailable, "down"))       // unsequenced: never resent
	if len(w.inDoubt) != 1 || w.inDoubt[7].method != "Step" {
		t.Fatalf("in doubt: %v", w.inDoubt)
	}
	w.record(7, call{method: "Step"}, nil)
	if len(w.inDoubt) != 0 {
		t.Fatalf("confirmed call still in doubt: %v", w.inDoubt)
	}
}
