"""The model and the data reach every host before launch.

Each local file or directory a run reads (a pretrained model's directory, a hub id resolved to
its local snapshot, the --data path) is named by a digest of its content. On every remote host
it lives at `<cache>/<digest>/<its name>`, where `<cache>` is --ship-cache, else
$MLX_TRAIN_SHIP_CACHE, else ~/.cache/mlx-train/shipped (a path on that host: "~/" is that host's
home). A copy counts only once its marker `<cache>/<digest>/.complete` exists: rsync fills the
directory first and the marker is written last, so an interrupted copy is resumed, never used.
A host that already holds the digest gets nothing; a host that cannot take it stops the run
before launch with one line naming it. Local ranks read the original path.

Every use of a copy touches its marker; when a run ships to a host, the copies there that no run
has used for --ship-cache-days days (default 30; 0 keeps everything) are removed, so a host's
disk does not fill with every version of a model or data set ever trained on.

The hosts come back with `placed` filled (original path as the config names it -> path on that
host); the rank on that host gets it as `--placed` and reads through TrainConfig.placed_at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mlx_train.config import ModelKind, TrainConfig
from mlx_train.errors import UserError
from mlx_train.events import Event
from mlx_train.fleet import ssh
from mlx_train.fleet.hosts import Host

DEFAULT_CACHE = "~/.cache/mlx-train/shipped"
CACHE_ENV = "MLX_TRAIN_SHIP_CACHE"
MARKER = ".complete"
# rsync gives up after this long without any data moving (a dead link), never mid-transfer.
RSYNC_IO_TIMEOUT_S = 120
PROBE_TIMEOUT_S = 30


@dataclass(frozen=True)
class Item:
    """One thing to ship: `key` is how the config names it, `source` where it lies here."""
    what: str       # "model" or "data"
    key: str
    source: Path
    digest: str
    size: int       # bytes of file content


@dataclass(frozen=True)
class Shipped:
    """How one item reached one host (recorded as a `ship` event)."""
    host: str
    what: str
    digest: str
    path: str       # where it lies on that host
    bytes: int      # bytes of content copied there (0 when skipped)
    seconds: float
    skipped: bool

    event_name = Event.SHIP

    def event(self) -> dict:
        return {"host": self.host, "what": self.what, "digest": self.digest[:16], "path": self.path,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "skipped": self.skipped}


@dataclass(frozen=True)
class Pruned:
    """Copies removed from one host's cache, unused for too long (recorded as a `ship_pruned` event)."""
    host: str
    removed: Tuple[str, ...]  # their digests
    bytes: int

    event_name = Event.SHIP_PRUNED

    def event(self) -> dict:
        return {"host": self.host, "removed": [d[:16] for d in self.removed], "bytes": self.bytes}


# ---------------------------------------------------------------- content digests

def _files(path: Path) -> List[Tuple[str, Path]]:
    """(relative posix path, path) of every file under `path` (or `path` itself), sorted; symlinks
    followed, as rsync -L copies them (hub snapshots are links into a blob store)."""
    if not path.is_dir():
        return [(path.name, path)]
    out = []
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs.sort()
        for n in names:
            p = Path(root) / n
            if p.is_file():
                out.append((p.relative_to(path).as_posix(), p))
    return sorted(out)


def _memo_path() -> Path:
    base = os.environ.get("MLX_TRAIN_CACHE") or Path.home() / ".cache" / "mlx-train"
    return Path(base) / "shipped-digests.json"


def _file_digest(p: Path, memo: Dict[str, list]) -> str:
    """sha256 of one file, remembered by (size, mtime, inode) so a multi-GB model is read once."""
    from mlx_train.rank.checkpoint import sha256_file

    st = p.stat()
    key, stamp = str(p.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = memo.get(key)
    if hit and hit[:3] == stamp:
        return hit[3]
    digest = sha256_file(p)
    memo[key] = stamp + [digest]
    return digest


def digest(path: Path, memo: Optional[Dict[str, list]] = None) -> Tuple[str, int]:
    """(content digest, bytes) of a file or directory: sha256 over its sorted relative paths, sizes
    and file digests. The same content under another name or place gives the same digest."""
    memo = {} if memo is None else memo
    h, total = hashlib.sha256(), 0
    for rel, p in _files(path):
        size = p.stat().st_size
        h.update(f"{'' if not path.is_dir() else rel}\0{size}\0{_file_digest(p, memo)}\n".encode())
        total += size
    h.update(b"dir" if path.is_dir() else b"file")
    return h.hexdigest(), total


def _load_memo() -> Dict[str, list]:
    try:
        memo = json.loads(_memo_path().read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_memo(memo: Dict[str, list]) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass  # only a speed-up: the next launch reads the files again


# ---------------------------------------------------------------- what a run needs shipped

def items(cfg: TrainConfig) -> List[Item]:
    """The local files a run's ranks read: a pretrained model's directory and the --data path.
    The built-in GPT, a module:factory model and the default data (the standard library) need none."""
    from mlx_train.rank import hf

    found: List[Tuple[str, str, Path]] = []
    if cfg.model.kind is ModelKind.PRETRAINED:
        found.append(("model", cfg.model.name, hf.model_path(cfg.model.name)))
    if cfg.data.path:
        found.append(("data", cfg.data.path, Path(cfg.data.path).expanduser()))
    memo = _load_memo()
    out = []
    for what, key, source in found:
        source = source.resolve()
        d, size = digest(source, memo)
        out.append(Item(what, key, source, d, size))
    _save_memo(memo)
    return out


def cache_dir(option: Optional[str] = None) -> str:
    """The cache path on every host: the option, $MLX_TRAIN_SHIP_CACHE, or the default."""
    path = option or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    if not (path.startswith("/") or path.startswith("~/")):
        raise UserError(f"ship cache {path!r} must be an absolute path or start with ~/ (a path on every host): "
                        f"fix --ship-cache or ${CACHE_ENV}")
    return path


def _shell_path(path: str) -> str:
    """`path` for the remote shell: "~/" is that host's $HOME, the rest quoted."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# ---------------------------------------------------------------- one host

def probe_script(cache: str, item: Item) -> str:
    """Run on the host: `present DIR` when the digest is complete there, `absent FREE_KIB USED_KIB
    DIR` when it can take it, else one line saying why not (exit 3). DIR last: it may hold spaces."""
    return f"""C={_shell_path(cache)}/{item.digest}
if [ -f "$C/{MARKER}" ]; then touch "$C/{MARKER}"; echo "present $C"; exit 0; fi
rsync --version >/dev/null 2>&1 || {{ echo "rsync is not installed there (apt-get install rsync; brew install rsync)"; exit 3; }}
mkdir -p "$C" 2>/dev/null && touch "$C/.probe" 2>/dev/null && rm -f "$C/.probe" || {{ echo "cannot write the cache directory $C (set --ship-cache or ${CACHE_ENV} to a writable path)"; exit 3; }}
echo "absent $(df -Pk "$C" | awk 'NR==2 {{print $4}}') $(du -sk "$C" | cut -f1) $C"
"""


def prune_script(cache: str, keep: List[str], days: int) -> str:
    """Run on the host: remove the cache's copies whose marker no run has touched for `days` days
    (or, with no marker, an abandoned partial copy untouched as long), except those in `keep`.
    Prints `pruned KIB DIGEST...` (find's -mtime +N means at least N+1 whole days)."""
    return f"""C={_shell_path(cache)}
freed=0; gone=""
[ -d "$C" ] && for d in "$C"/*/; do
  d=${{d%/}}; n=${{d##*/}}
  case " {' '.join(keep)} " in *" $n "*) continue;; esac
  m="$d/{MARKER}"; [ -f "$m" ] || m="$d"
  [ -n "$(find "$m" -prune -mtime +{days - 1} 2>/dev/null)" ] || continue
  k=$(du -sk "$d" 2>/dev/null | cut -f1)
  rm -rf "$d" 2>/dev/null && [ ! -e "$d" ] && freed=$((freed + ${{k:-0}})) && gone="$gone $n"
done
echo "pruned $freed$gone"
"""


def prune(host: Host, cache: str, keep: List[str], days: int) -> Optional[Pruned]:
    """Drop `host`'s unused copies (prune_script). Housekeeping: a failure never stops a run, it
    only leaves the copies where they are (None)."""
    try:
        res = ssh.run(host.name, prune_script(cache, keep, days), timeout=PROBE_TIMEOUT_S, fresh=True)
    except OSError:
        return None
    words = _last(res.out).split()
    if not res.ok or len(words) < 2 or words[0] != "pruned" or not words[1].isdigit():
        return None
    return Pruned(host.name, tuple(words[2:]), int(words[1]) * 1024)


def rsync_argv(item: Item, dest: str, remote_dir: str) -> List[str]:
    """rsync of `item` into `remote_dir/<its name>` on `dest` over the fleet's ssh options."""
    ssh_cmd = shlex.join(["ssh", "-T", *ssh.options(fresh=True)])
    src = f"{item.source}/" if item.source.is_dir() else str(item.source)
    target = f"{remote_dir}/{item.source.name}" + ("/" if item.source.is_dir() else "")
    # Only options macOS's own rsync (openrsync) takes too.
    return ["rsync", "-a", "-L", "--partial", f"--timeout={RSYNC_IO_TIMEOUT_S}", "-e", ssh_cmd, src, f"{dest}:{target}"]


def _last(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ship_one(host: Host, item: Item, cache: str) -> Shipped:
    """Make `item` complete on `host`; UserError (naming the host) when it cannot be."""
    t0 = time.monotonic()
    fail = f"cannot ship the {item.what} ({item.source}) to {host.name}"
    res = ssh.run(host.name, probe_script(cache, item), timeout=PROBE_TIMEOUT_S, fresh=True)
    answer = _last(res.out)
    if res.code == 3:
        raise UserError(f"{fail}: {answer}")
    state, _, rest = answer.partition(" ")
    if not res.ok or state not in ("present", "absent") or not rest:
        raise UserError(f"{fail}: ssh {host.name} failed ({res.why()}): check `ssh {host.name}` works")
    if state == "present":
        placed = f"{rest}/{item.source.name}"
        return Shipped(host.name, item.what, item.digest, placed, 0, time.monotonic() - t0, True)
    free, used, remote_dir = (rest.split(" ", 2) + ["", ""])[:3]
    placed = f"{remote_dir}/{item.source.name}"
    try:
        free_kib, used_kib = int(free), int(used)
    except ValueError:
        free_kib, used_kib = None, 0
    need_kib = item.size // 1024 - used_kib
    if free_kib is not None and need_kib > free_kib:
        raise UserError(f"{fail}: it needs {need_kib // 1024 + 1} MiB more in {remote_dir} and {free_kib // 1024} MiB "
                        f"are free there: free space, or set --ship-cache to a larger disk")
    try:
        cp = subprocess.run(rsync_argv(item, host.name, remote_dir), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UserError(f"{fail}: rsync is not installed here (make install; apt-get install rsync; "
                        "brew install rsync)") from None
    if cp.returncode:
        raise UserError(f"{fail}: rsync exited {cp.returncode} ({_last(cp.stderr) or 'no message'})")
    note = json.dumps({"digest": item.digest, "bytes": item.size, "source": str(item.source), "time": time.time()})
    mark = (f'C={shlex.quote(remote_dir)} && printf "%s\\n" {shlex.quote(note)} > "$C/{MARKER}.tmp" '
            f'&& mv "$C/{MARKER}.tmp" "$C/{MARKER}"')
    done = ssh.run(host.name, mark, timeout=PROBE_TIMEOUT_S, fresh=True)
    if not done.ok:
        raise UserError(f"{fail}: cannot write its marker ({done.why()})")
    return Shipped(host.name, item.what, item.digest, placed, item.size, time.monotonic() - t0, False)


# ---------------------------------------------------------------- the fleet

def ship(cfg: TrainConfig, hosts: List[Host], cache: Optional[str], keep_days: int) -> Tuple[List[Host], list]:
    """Every remote host gets what the run reads (hosts in parallel, items in turn on each), then
    drops the copies no run has used for `keep_days` days (0: none); the hosts come back with
    `placed` filled, with what happened (Shipped and Pruned records, each with its event). The
    first host (in cluster order) that cannot take it stops the run: UserError naming it."""
    remote = [h for h in hosts if not h.local]
    if not remote:
        return hosts, []
    wanted = items(cfg)
    if not wanted:
        return hosts, []
    where = cache_dir(cache)
    if shutil.which("rsync") is None:
        raise UserError("the model and data are copied to the hosts with rsync, which is not installed here: "
                        "run `make install` (Debian: apt-get install rsync; macOS: brew install rsync)")

    def one(host: Host):
        try:
            done = [ship_one(host, item, where) for item in wanted]
        except UserError as exc:
            return exc
        pruned = prune(host, where, [item.digest for item in wanted], keep_days) if keep_days else None
        return done + ([pruned] if pruned is not None and pruned.removed else [])

    results = dict(zip([h.name for h in remote], ssh.parallel(one, remote)))
    for h in remote:
        if isinstance(results[h.name], UserError):
            raise results[h.name]
    placed = {h.name: {item.key: s.path for item, s in zip(wanted, results[h.name])} for h in remote}
    return ([replace(h, placed=placed.get(h.name, {})) for h in hosts],
            [s for h in remote for s in results[h.name]])
