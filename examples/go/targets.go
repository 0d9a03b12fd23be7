package twinkle

// Where the workers of a mesh are: an address list, or a group of a cluster config (README,
// "Workers and clusters"). Each source resolves to Targets, which Connect takes; a source
// that asks rank 0 for its peers would be one more function returning Targets.

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

// ClusterEnv is the variable that holds a cluster config, as a path or as the JSON itself.
const ClusterEnv = "TWINKLE_CLUSTER"

// Targets are the worker addresses in global-rank order, the rendezvous (empty: rank 0's host
// and a port it reports free), and how to reach them.
type Targets struct {
	Addresses  []string
	MasterAddr string
	MasterPort int
	Security   Security
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

type clusterGroup struct {
	Workers       []string `json:"workers"`
	MasterAddr    string   `json:"master_addr"`
	MasterPort    int      `json:"master_port"`
	TokenEnv      string   `json:"token_env"`
	TLSRootCert   string   `json:"tls_root_cert"`
	TLSClientCert string   `json:"tls_client_cert"`
	TLSClientKey  string   `json:"tls_client_key"`
	TLSServerName string   `json:"tls_server_name"`
}

// FromCluster reads group `name` of a cluster config: source is a path or the JSON itself
// (empty: $TWINKLE_CLUSTER). With one group, name may be empty. The token comes from the
// variable named by token_env.
func FromCluster(source, name string) (Targets, error) {
	if source == "" {
		source = os.Getenv(ClusterEnv)
	}
	text := strings.TrimSpace(source)
	if text == "" {
		return Targets{}, fmt.Errorf("no cluster config: pass one or set %s", ClusterEnv)
	}
	if !strings.HasPrefix(text, "{") {
		data, err := os.ReadFile(text)
		if err != nil {
			return Targets{}, fmt.Errorf("cluster config: %v", err)
		}
		text = string(data)
	}
	var config struct {
		Groups map[string]clusterGroup `json:"groups"`
	}
	if err := json.Unmarshal([]byte(text), &config); err != nil || config.Groups == nil {
		return Targets{}, fmt.Errorf(`cluster config must be {"groups": {"<name>": {"workers": [...]}}} (%v)`, err)
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
		return Targets{}, fmt.Errorf("group %q is not in the cluster config; groups: %v", name, names)
	}
	security := Security{
		RootCert: group.TLSRootCert, ClientCert: group.TLSClientCert, ClientKey: group.TLSClientKey,
		ServerName: group.TLSServerName,
	}
	if group.TokenEnv != "" {
		security.Token = os.Getenv(group.TokenEnv)
	}
	targets, err := FromAddresses(group.Workers, security)
	if err != nil {
		return Targets{}, fmt.Errorf("cluster group %q: %v", name, err)
	}
	targets.MasterAddr, targets.MasterPort = group.MasterAddr, group.MasterPort
	return targets, nil
}

// HostOf gives the host of "host:port" ("[::1]:50051" -> "::1").
func HostOf(address string) string {
	host := address[:strings.LastIndex(address, ":")]
	return strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
}
