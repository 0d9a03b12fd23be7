package twinkle

// Where the workers of a mesh are: an address list, a group of a cluster config (README,
// "Workers and clusters"), or rank 0's address alone (FromRank0, discovery.go). Each source
// resolves to Targets, which Connect takes.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"
)

// ClusterEnv is the variable that holds a cluster config, as a path or as the JSON itself.
const ClusterEnv = "TWINKLE_CLUSTER"

// Targets are the worker addresses in global-rank order, the rendezvous (empty: rank 0's host
// and a port it reports free), and how to reach them. Found through rank 0 (FromRank0), they
// also hold rank 0's address and each rank's incarnation, so a failed call names a restarted rank.
type Targets struct {
	Addresses    []string
	MasterAddr   string
	MasterPort   int
	Security     Security
	Rank0        string   // the address the mesh was discovered from; "" for an address list
	Incarnations []string // per rank, from GetMesh; nil for an address list
}

// FromAddresses takes workers named one by one, in global-rank order.
func FromAddresses(addresses []string, security Security) (Targets, error) {
	for rank, address := range addresses {
		if !strings.Contains(address, ":") {
			return Targets{}, fmt.Errorf("worker %d: %q is not host:port", rank, address)
		}
	}
	if len(addresses) == 0 {
		return Targets{}, fmt.Errorf("no worker addresses")
	}
	return Targets{Addresses: addresses, Security: security}, nil
}

// ClusterGroup is one group of a cluster config: its workers in global-rank order, or (for workers
// that an engine placed) only rank 0's address, and how to reach them.
type ClusterGroup struct {
	Name          string
	Workers       []string `json:"workers"`
	Rank0         string   `json:"rank0"`
	MasterAddr    string   `json:"master_addr"`
	MasterPort    int      `json:"master_port"`
	TokenEnv      string   `json:"token_env"`
	TLSRootCert   string   `json:"tls_root_cert"`
	TLSClientCert string   `json:"tls_client_cert"`
	TLSClientKey  string   `json:"tls_client_key"`
	TLSServerName string   `json:"tls_server_name"`
}

// Security is the group's TLS settings and the token from the variable named by token_env.
func (g ClusterGroup) Security() Security {
	security := Security{
		RootCert: g.TLSRootCert, ClientCert: g.TLSClientCert, ClientKey: g.TLSClientKey,
		ServerName: g.TLSServerName,
	}
	if g.TokenEnv != "" {
		security.Token = os.Getenv(g.TokenEnv)
	}
	return security
}

// Resolve gives the group's Targets with the given security: its workers as listed, or those
// rank 0 reports (FromRank0, waiting up to wait for every rank to register).
func (g ClusterGroup) Resolve(ctx context.Context, security Security, wait time.Duration) (Targets, error) {
	if g.Rank0 != "" {
		targets, err := FromRank0(ctx, g.Rank0, Rank0Options{Security: security, Wait: wait})
		if err != nil {
			return Targets{}, fmt.Errorf("cluster group %q: %w", g.Name, err)
		}
		if g.MasterAddr != "" || g.MasterPort != 0 { // the config's rendezvous overrides rank 0's
			targets.MasterAddr, targets.MasterPort = g.MasterAddr, g.MasterPort
		}
		return targets, nil
	}
	targets, err := FromAddresses(g.Workers, security)
	if err != nil {
		return Targets{}, fmt.Errorf("cluster group %q: %v", g.Name, err)
	}
	targets.MasterAddr, targets.MasterPort = g.MasterAddr, g.MasterPort
	return targets, nil
}

// ParseCluster reads group `name` of a cluster config: source is a path or the JSON itself
// (empty: $TWINKLE_CLUSTER). With one group, name may be empty. Nothing is dialled.
func ParseCluster(source, name string) (ClusterGroup, error) {
	if source == "" {
		source = os.Getenv(ClusterEnv)
	}
	text := strings.TrimSpace(source)
	if text == "" {
		return ClusterGroup{}, fmt.Errorf("no cluster config: pass one or set %s", ClusterEnv)
	}
	if !strings.HasPrefix(text, "{") {
		data, err := os.ReadFile(text)
		if err != nil {
			return ClusterGroup{}, fmt.Errorf("cluster config: %v", err)
		}
		text = string(data)
	}
	var config struct {
		Groups map[string]ClusterGroup `json:"groups"`
	}
	if err := json.Unmarshal([]byte(text), &config); err != nil || config.Groups == nil {
		return ClusterGroup{}, fmt.Errorf(`cluster config must be {"groups": {"<name>": {"workers": [...]}}} (%v)`, err)
	}
	names := make([]string, 0, len(config.Groups))
	for group := range config.Groups {
		names = append(names, group)
	}
	sort.Strings(names)
	if name == "" && len(names) == 1 {
		name = names[0]
	}
	group, found := config.Groups[name]
	if !found {
		return ClusterGroup{}, fmt.Errorf("group %q is not in the cluster config; groups: %v", name, names)
	}
	group.Name = name
	if group.Rank0 != "" && (!strings.Contains(group.Rank0, ":") || len(group.Workers) > 0) {
		return ClusterGroup{}, fmt.Errorf("cluster group %q: 'rank0' is one 'host:port', and excludes 'workers'", name)
	}
	if group.Rank0 == "" && len(group.Workers) == 0 {
		return ClusterGroup{}, fmt.Errorf("cluster group %q needs 'workers' (a list of 'host:port' in rank order) "+
			"or 'rank0' ('host:port')", name)
	}
	return group, nil
}

// FromCluster reads group `name` of a cluster config (ParseCluster) and resolves it with the
// config's own security; a group naming only rank 0 asks it (DefaultMeshWait at most).
func FromCluster(source, name string) (Targets, error) {
	group, err := ParseCluster(source, name)
	if err != nil {
		return Targets{}, err
	}
	return group.Resolve(context.Background(), group.Security(), DefaultMeshWait)
}

// HostOf gives the host of "host:port" ("[::1]:50051" -> "::1").
func HostOf(address string) string {
	host := address[:strings.LastIndex(address, ":")]
	return strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
}
