"""Generate the Python stubs of proto/pdserve/v1/pdserve.proto into cluster/api/.

    python scripts/gen_proto.py            # rewrite cluster/api/pdserve_pb2*.py(i)
    python scripts/gen_proto.py --out DIR  # write them into DIR instead (tests compare)

protoc writes `from pdserve.v1 import pdserve_pb2`, after the proto package; the stubs live in
`pdserve.cluster.api`, so that import is rewritten. The output depends only on the .proto and
the grpcio-tools version (named in each file's header).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "pdserve/v1/pdserve.proto"
API_DIR = ROOT / "cluster" / "api"
GENERATED = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")
IMPORT_FROM = "from pdserve.v1 import pdserve_pb2 as"
IMPORT_TO = "from pdserve.cluster.api import pdserve_pb2 as"
INIT = ('"""Generated gRPC stubs of proto/pdserve/v1/pdserve.proto (scripts/gen_proto.py); '
        'do not edit."""\n')


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "pdserve" / "v1" / name).read_text()
            if name.endswith("_grpc.py"):
                if IMPORT_FROM not in text:
                    raise RuntimeError(f"{name}: expected {IMPORT_FROM!r} to rewrite")
                text = text.replace(IMPORT_FROM, IMPORT_TO)
            dest = out_dir / name
            dest.write_text(text)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=API_DIR)
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    init = args.out / "__init__.py"
    if args.out == API_DIR and not init.exists():
        init.write_text(INIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
