"""Generate the Python code of protos/ into a package of ours: `make protos` runs this.

    python protos/generate.py [OUT]      (OUT defaults to controlplane/_gen)

Every `protos/<pkg>/*.proto` becomes `OUT/<pkg>/*_pb2.py`, compiled by grpcio-tools' protoc.
protoc writes imports between our files as absolute (`from switchyard_metrics import x_pb2`),
which only works with protos/' layout on sys.path; they are rewritten as package-relative
(`from . import x_pb2`) so that the code lives at `controlplane._gen.<pkg>`. No `_pb2_grpc`
modules: their import-time check wants a grpcio at least as new as the grpcio-tools that
generated them; the one servicer registers its method itself.

tests/test_envoy_stats.py runs this into a temporary directory and compares the result with
the committed code byte for byte.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
DEFAULT_OUT = ROOT / "controlplane" / "_gen"
INIT = '"""Generated from protos/ by `make protos` (protos/generate.py): do not edit."""\n'


def packages() -> list[Path]:
    return sorted(p for p in PROTOS.iterdir() if p.is_dir() and any(p.glob("*.proto")))


def generate(out: Path) -> list[Path]:
    """(Re)write OUT: its __init__.py and one subpackage per proto package. Returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text(INIT)
    written = [out / "__init__.py"]
    for package in packages():
        sources = sorted(package.glob("*.proto"))
        with tempfile.TemporaryDirectory() as scratch:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"--python_out={scratch}",
                *(str(source.relative_to(PROTOS)) for source in sources),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {package.name}")
            target = out / package.name
            shutil.rmtree(target, ignore_errors=True)  # no stale modules of deleted protos
            target.mkdir()
            (target / "__init__.py").write_text(INIT)
            written.append(target / "__init__.py")
            bare = re.compile(rf"^from {re.escape(package.name)} import ", re.MULTILINE)
            for generated in sorted((Path(scratch) / package.name).glob("*.py")):
                code = bare.sub("from . import ", generated.read_text())
                (target / generated.name).write_text(code)
                written.append(target / generated.name)
    return written


if __name__ == "__main__":
    destination = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(destination):
        print(path)
