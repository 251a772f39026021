"""Build the wheelhouse python_env ships to the nodes; runs on the controller, prints JSON.

The project checkout and all its runtime dependencies become wheels under
<root>/<key>/ and one tar <root>/<key>.tar, where key = python tag, platform and a hash of the
project sources. Nothing is rebuilt while the sources are unchanged, which keeps reruns fast
and the tar byte-identical (so copying it to the nodes reports no change).
Usage: python wheelhouse.py PROJECT_DIR WHEELHOUSE_ROOT
"""
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SKIP = {"__pycache__", ".pytest_cache"}


def source_hash(project: Path) -> str:
    files = [project / n for n in ("pyproject.toml", "setup.cfg", "setup.py", "README.md") if (project / n).is_file()]
    files += [p for p in (project / "src").rglob("*")
              if p.is_file() and not SKIP.intersection(p.parts) and p.suffix != ".pyc"
              and not any(part.endswith(".egg-info") for part in p.parts)]
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(project)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def write_tar(src: Path, dest: Path) -> None:
    """Deterministic tar (sorted, no times or owners): same wheels, same bytes."""
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for whl in sorted(src.glob("*.whl")):
            info = tar.gettarinfo(whl, arcname=whl.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with whl.open("rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(dest)


def project_wheel(project: Path, wheels: Path) -> str:
    text = (project / "pyproject.toml").read_text()
    try:
        import tomllib
        name = tomllib.loads(text)["project"]["name"]
    except ImportError:  # Python 3.10
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return next(w.name for w in wheels.glob(f"{stem}-*.whl"))


def main() -> None:
    project, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).expanduser().resolve()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{platform.machine()}"
    key = f"{tag}-{source_hash(project)}"
    wheels, tar = root / key, root / f"{key}.tar"
    changed = False
    if not (wheels / ".complete").exists():
        shutil.rmtree(wheels, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                        "--wheel-dir", str(wheels), str(project)], check=True, stdout=sys.stderr)
        (wheels / ".complete").touch()
        changed = True
    if not tar.exists():
        write_tar(wheels, tar)
        changed = True
    for old in root.iterdir():  # one checkout, one current wheelhouse
        if old.name not in (key, f"{key}.tar"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    print(json.dumps({
        "changed": changed, "key": key, "tar": str(tar), "project_wheel": project_wheel(project, wheels),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "system": platform.system(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
