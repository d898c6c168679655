"""The Python modules of runtime/lockstep.proto, generated with grpcio-tools on first use.

Generated code is never committed or edited: the first import runs `grpc_tools.protoc` on the
.proto that ships in this package, into lockstep_home()/grpc/<hash of the proto and of
grpcio-tools' version>, and later imports reuse that directory. A changed .proto (or a new
grpcio-tools) gets a fresh directory, so a stale build is never loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from types import ModuleType

from .fetch import lockstep_home

PROTO_NAME = "lockstep.proto"
MODULES = ("lockstep_pb2", "lockstep_pb2_grpc")


def proto_path() -> Path:
    """The .proto as installed beside this module (importlib.resources: works from a wheel too)."""
    return Path(str(resources.files(__package__) / PROTO_NAME))


def generated_dir(home: Path | None = None) -> Path:
    """The directory holding lockstep_pb2.py and lockstep_pb2_grpc.py, generating them if needed."""
    import grpc_tools
    from grpc_tools import protoc

    proto = proto_path()
    version = getattr(grpc_tools, "__version__", "") or _dist_version("grpcio-tools")
    digest = hashlib.sha256(proto.read_bytes() + version.encode()).hexdigest()[:16]
    out = (home or lockstep_home()) / "grpc" / digest
    if all((out / f"{m}.py").exists() for m in MODULES):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    try:
        well_known = resources.files("grpc_tools") / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto.parent}", f"-I{well_known}",
                          f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(proto)])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {proto}")
        try:
            os.replace(tmp, out)  # atomic: a concurrent build either wins or finds ours
        except OSError:
            if not all((out / f"{m}.py").exists() for m in MODULES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load() -> tuple[ModuleType, ModuleType]:
    """(lockstep_pb2, lockstep_pb2_grpc), imported from the generated directory.

    The _grpc module imports `lockstep_pb2` by that top-level name, so the message module is
    registered under it in sys.modules (once per process: protobuf's descriptor pool allows a
    file to be added only once)."""
    if all(m in sys.modules for m in MODULES):
        return sys.modules[MODULES[0]], sys.modules[MODULES[1]]
    directory = generated_dir()
    loaded = []
    for name in MODULES:
        if name in sys.modules:
            loaded.append(sys.modules[name])
            continue
        spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


pb2, pb2_grpc = load()
