"""Python stubs generated from proto/ at run time with grpcio-tools, so the
clients here always match the .proto files the Rust services are built from."""

import atexit
import importlib.resources
import shutil
import sys
import tempfile

from grpc_tools import protoc

GOOGLE_API = ["google/api/http.proto", "google/api/annotations.proto"]
# protovalidate's own file, which meshkit's protos import for their request rules
# (vendored in proto/). Generated here like google/api: the protovalidate package
# on PyPI imports `buf.validate.validate_pb2` but does not ship it.
BUF_VALIDATE = ["buf/validate/validate.proto"]


def load(proto_dir, protos):
    """Generates `protos` (and google/api and buf/validate, which they import)
    into a temp dir and puts it on sys.path, so `meshkit.user.v1.user_pb2`,
    `buf.validate.validate_pb2` and the like import."""
    out = tempfile.mkdtemp(prefix="meshkit-py-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    for proto in GOOGLE_API + BUF_VALIDATE + list(protos):
        code = protoc.main(
            ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", proto]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
