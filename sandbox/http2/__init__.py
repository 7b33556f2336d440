"""flatpod's own HTTP/2 server for the CRI socket: frames (frames.py), one connection's
streams and flow control (connection.py), gRPC on top (grpc_calls.py), the listener
(listener.py). It imports nothing from the rest of `sandbox`, so that it can be read and
tested alone."""
