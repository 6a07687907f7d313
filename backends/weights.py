"""Official model checkpoints: where they live on disk and how to fetch them (``tapmask weights``).

Nothing here runs at serve time: models only *read* ``models_dir()``; downloading is an explicit
command. Files are streamed to a temporary file next to the destination, checked against the
published SHA-256, and only then renamed into place, so an interrupted or corrupted download never
leaves a file under the final name.

The SHA-256 values below are the ones published for Meta's SAM checkpoints and used by several
independent projects (micro-sam's pooch registry among them). The 6 hex digits in each official
file name (``sam_vit_h_4b8939.pth``) are *not* a SHA-256 prefix (reportedly they start the file's
MD5), so they are not used for verification. Sizes are informational (progress bar, messages).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backends.errors import ModelLoadError, ModelNotFound

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One downloadable checkpoint."""

    url: str
    filename: str
    sha256: str
    size: int | None = None  # bytes, for the progress bar and a clearer mismatch message


_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

#: Weight names accepted by ``download`` (and ``tapmask weights NAME``).
OFFICIAL_WEIGHTS: dict[str, WeightFile] = {
    "sam-vit_b": WeightFile(
        _SAM_BASE + "sam_vit_b_01ec64.pth",
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    "sam-vit_l": WeightFile(
        _SAM_BASE + "sam_vit_l_0b3195.pth",
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    "sam-vit_h": WeightFile(
        _SAM_BASE + "sam_vit_h_4b8939.pth",
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
}


def models_dir() -> Path:
    """``$TAPMASK_MODELS_DIR``, else ``~/.cache/tapmask/models``."""
    configured = os.environ.get("TAPMASK_MODELS_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/tapmask/models"


def names() -> list[str]:
    return sorted(OFFICIAL_WEIGHTS)


def _lookup(name: str, table: Mapping[str, WeightFile]) -> WeightFile:
    try:
        return table[name]
    except KeyError:
        raise ModelNotFound(
            f"no downloadable weights named {name!r}; known: {', '.join(sorted(table))}"
        ) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    name: str,
    dest_dir: Path | None = None,
    *,
    table: Mapping[str, WeightFile] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch weights ``name`` into ``dest_dir`` (default ``models_dir()``) and return the path.

    A file already there with the right SHA-256 is kept as is. ``table`` replaces
    ``OFFICIAL_WEIGHTS`` (tests point it at ``file://`` URLs).
    """
    entry = _lookup(name, OFFICIAL_WEIGHTS if table is None else table)
    dest_dir = Path(dest_dir) if dest_dir is not None else models_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / entry.filename
    if target.is_file() and sha256_of(target) == entry.sha256:
        return target

    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        written = 0
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(entry.url, timeout=timeout) as resp,
            ):
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else entry.size
                bar = _progress_bar(total, entry.filename, enabled=progress)
                try:
                    for block in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
                finally:
                    bar.close()
        except OSError as exc:  # URLError, HTTPError, timeouts, disk full
            raise ModelLoadError(f"downloading {entry.url} failed: {exc}") from exc
        actual = digest.hexdigest()
        if actual != entry.sha256:
            size_note = (
                f" ({written} bytes, expected {entry.size})"
                if entry.size is not None and written != entry.size
                else ""
            )
            raise ModelLoadError(
                f"checksum mismatch for {entry.url}{size_note}: sha256 {actual}, "
                f"expected {entry.sha256}; the download was discarded"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, desc: str, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
