"""Generated gRPC stubs of proto/pdserve/v1/pdserve.proto (scripts/gen_proto.py); do not edit."""
