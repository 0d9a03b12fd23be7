package twinkle

// How the client reaches its workers: plaintext or TLS (optionally mutual), and the bearer
// token of docs/protocol.md section 11.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Security says how to reach the workers. TLS is on when RootCert is set or TLS is true
// (then the system's roots are used); ClientCert + ClientKey add a client certificate
// (mutual TLS); ServerName overrides the name checked against the workers' certificates.
type Security struct {
	Token      string
	TLS        bool
	RootCert   string // PEM file of the CA that signed the workers' certificates
	ClientCert string // PEM files of this client's certificate and key
	ClientKey  string
	ServerName string
}

// UsesTLS reports whether connections are encrypted.
func (s Security) UsesTLS() bool {
	return s.TLS || s.RootCert != "" || s.ClientCert != ""
}

// DialOptions are the grpc options for the transport and the token.
func (s Security) DialOptions() ([]grpc.DialOption, error) {
	var options []grpc.DialOption
	if s.UsesTLS() {
		config, err := s.tlsConfig()
		if err != nil {
			return nil, err
		}
		options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		// grpc-go 1.33 (Debian 12) has no credentials/insecure; WithInsecure is the same there.
		options = append(options, grpc.WithInsecure())
	}
	if s.Token != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearer{token: s.Token, secure: s.UsesTLS()}))
	}
	return options, nil
}

func (s Security) tlsConfig() (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.ServerName}
	if s.RootCert != "" {
		pem, err := os.ReadFile(s.RootCert)
		if err != nil {
			return nil, fmt.Errorf("tls root certificate: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls root certificate %s holds no PEM certificate", s.RootCert)
		}
		config.RootCAs = pool
	}
	if (s.ClientCert == "") != (s.ClientKey == "") {
		return nil, fmt.Errorf("a client certificate and its key go together")
	}
	if s.ClientCert != "" {
		pair, err := tls.LoadX509KeyPair(s.ClientCert, s.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("tls client certificate: %v", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// bearer sends "authorization: Bearer <token>" on every call. A worker takes a token over
// plaintext too (it may sit behind a TLS-terminating proxy), so it does not insist on TLS.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }
