package twinkle

// Rank 0's GetMesh answer turned into Targets, and which ranks count as restarted.

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

func member(rank int32, address, incarnation string) *workerv1.MeshMember {
	return &workerv1.MeshMember{Rank: rank, WorldSize: 3, Address: address, Incarnation: incarnation}
}

func TestAMeshIsOrderedByRankWithItsIncarnationsAndRendezvous(t *testing.T) {
	mesh := &workerv1.GetMeshResponse{WorldSize: 3, Complete: true, MasterAddr: "host-a", MasterPort: 0,
		Members: []*workerv1.MeshMember{member(2, "c:3", "i2"), member(0, "a:1", "i0"), member(1, "b:2", "i1")}}
	targets, err := targetsOfMesh("a:1", mesh, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(targets.Addresses, []string{"a:1", "b:2", "c:3"}) ||
		!reflect.DeepEqual(targets.Incarnations, []string{"i0", "i1", "i2"}) ||
		targets.Rank0 != "a:1" || targets.MasterAddr != "host-a" || targets.MasterPort != 0 {
		t.Errorf("targets %+v", targets)
	}
}

func TestAnIncompleteMeshNamesTheMissingRanks(t *testing.T) {
	mesh := &workerv1.GetMeshResponse{WorldSize: 3, Complete: false,
		Members: []*workerv1.MeshMember{member(0, "a:1", "i0"), member(2, "c:3", "i2")}}
	_, err := targetsOfMesh("a:1", mesh, 5*time.Second)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "rank(s) [1] did not register within 5s") {
		t.Errorf("got %v", err)
	}
}

func TestAMeshThatDoesNotFitIsRefused(t *testing.T) {
	for name, members := range map[string][]*workerv1.MeshMember{
		"duplicate":    {member(0, "a:1", "i0"), member(0, "b:2", "i1"), member(2, "c:3", "i2")},
		"out of range": {member(0, "a:1", "i0"), member(1, "b:2", "i1"), member(3, "c:3", "i2")},
		"no address":   {member(0, "a:1", "i0"), member(1, "", "i1"), member(2, "c:3", "i2")},
	} {
		mesh := &workerv1.GetMeshResponse{WorldSize: 3, Complete: true, Members: members}
		if _, err := targetsOfMesh("a:1", mesh, time.Second); err == nil || !strings.Contains(err.Error(), "does not fit") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := targetsOfMesh("a:1", &workerv1.GetMeshResponse{}, time.Second); err == nil {
		t.Error("world size 0 accepted")
	}
}

func TestARankIsRestartedOnlyWhenItAnswersWithAnotherIncarnation(t *testing.T) {
	seen := []string{"i0", "i1", "i2"}
	got := restartedRanks(seen, []string{"i0", "j1", ""}) // rank 2 did not answer: no evidence
	if !reflect.DeepEqual(got, map[int]string{1: "j1"}) {
		t.Errorf("got %v", got)
	}
	cause := &RankError{Method: "ForwardBackward", Rank: 0, Address: "a:1", Code: codes.Aborted, Detail: "peer"}
	err := error(&RestartError{Restarted: got, Targets: Targets{Addresses: []string{"a:1", "b:2", "c:3"},
		Incarnations: seen}, Cause: cause})
	if !strings.Contains(err.Error(), "rank 1 (b:2, incarnation i1 -> j1) restarted") {
		t.Errorf("message %q", err)
	}
	var rankErr *RankError
	if !errors.As(err, &rankErr) || rankErr != cause {
		t.Error("the cause is not unwrapped")
	}
}
