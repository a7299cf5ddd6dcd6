"""The PD channel: JSON-RPC 2.0 over SOCK_SEQPACKET (protocol), the layer's server
(server, dispatch) and connections between PDs (connections).  docs/protocol.md
is the reference; the semantics (who may do what) live in bmi/api.py."""
