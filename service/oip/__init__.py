"""The Open Inference Protocol (KServe v2): its meaning (protocol.py), over REST (rest.py) and
gRPC (grpc.py)."""
