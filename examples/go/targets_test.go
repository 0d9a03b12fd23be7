package twinkle

// Cluster configs (README, "Workers and clusters") and address lists.

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestClusterConfigFromJSONAndFromAFile(t *testing.T) {
	t.Setenv("GO_TEST_TOKEN", "s3cret")
	config := `{"groups": {"actor": {"workers": ["host-a:50051", "host-b:50051"], "master_addr": "host-a",
	            "master_port": 29500, "token_env": "GO_TEST_TOKEN", "tls_root_cert": "/ca.pem",
	            "tls_client_cert": "/c.pem", "tls_client_key": "/c.key", "tls_server_name": "workers"}}}`
	path := filepath.Join(t.TempDir(), "cluster.json")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, source := range []string{config, path} {
		targets, err := FromCluster(source, "")
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(targets.Addresses, []string{"host-a:50051", "host-b:50051"}) ||
			targets.MasterAddr != "host-a" || targets.MasterPort != 29500 {
			t.Errorf("targets %+v", targets)
		}
		want := Security{Token: "s3cret", RootCert: "/ca.pem", ClientCert: "/c.pem", ClientKey: "/c.key", ServerName: "workers"}
		if targets.Security != want || !targets.Security.UsesTLS() {
			t.Errorf("security %+v", targets.Security)
		}
	}
}

func TestClusterConfigFromTheEnvironmentAndItsErrors(t *testing.T) {
	t.Setenv(ClusterEnv, `{"groups": {"a": {"workers": ["h:1"]}, "b": {"workers": ["h:2", "h:3"]}}}`)
	if targets, err := FromCluster("", "b"); err != nil || len(targets.Addresses) != 2 || targets.Security.UsesTLS() {
		t.Fatalf("group b: %+v, %v", targets, err)
	}
	for name, want := range map[string]string{"": `group "" is not in the cluster config`, "c": `group "c"`} {
		if _, err := FromCluster("", name); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("group %q: %v", name, err)
		}
	}
	bad := map[string]string{
		`{"groups": {"a": {"workers": ["no-port"]}}}`:             "not host:port",
		`{"groups": {"a": {"workers": []}}}`:                      "needs 'workers'",
		`{"groups": {"a": {"rank0": "no-port"}}}`:                 "'rank0' is one 'host:port'",
		`{"groups": {"a": {"rank0": "h:1", "workers": ["h:1"]}}}`: "excludes 'workers'",
		`{"workers": ["h:1"]}`:                                    `{"groups"`,
		`{not json`:                                               `{"groups"`,
	}
	for config, want := range bad {
		if _, err := FromCluster(config, ""); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", config, err)
		}
	}
	t.Setenv(ClusterEnv, "")
	if _, err := FromCluster("", ""); err == nil || !strings.Contains(err.Error(), ClusterEnv) {
		t.Errorf("no config: %v", err)
	}
}

func TestAClusterGroupMayNameOnlyRank0(t *testing.T) {
	t.Setenv("GO_TEST_TOKEN", "s3cret")
	group, err := ParseCluster(`{"groups": {"placed": {"rank0": "host-a:50100", "token_env": "GO_TEST_TOKEN"}}}`, "")
	if err != nil {
		t.Fatal(err)
	}
	if group.Name != "placed" || group.Rank0 != "host-a:50100" || len(group.Workers) != 0 ||
		group.Security().Token != "s3cret" {
		t.Errorf("group %+v", group)
	}
}

func TestHostOf(t *testing.T) {
	for address, host := range map[string]string{"10.0.0.7:50051": "10.0.0.7", "[::1]:50051": "::1", "h:1": "h"} {
		if got := HostOf(address); got != host {
			t.Errorf("%s -> %s", address, got)
		}
	}
}
