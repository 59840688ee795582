"""Checked downloads into the model cache, and model names resolved to cached folders.

A download goes to `NAME.part` (resumed with an HTTP Range request after a cut connection), is
checked against its md5/sha256 before anything else touches it, and only then becomes the model:
a tar is extracted into a temporary folder (refusing absolute paths, `..`, links and devices) that
is renamed into place, so a folder in the cache is always a complete, verified model.

Cache: `$TRAMONTANE_HOME/models/NAME/` (default `~/.cache/tramontane/models/NAME/`).

Example:
    >>> folder = download_card(find_card("mistral-7b-instruct-v0.3"))   # once, ~14 GB
    >>> load_model("mistral-7b-instruct-v0.3")                          # then by name
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .cards import Card, find_card
from .errors import CheckpointError

CHUNK = 1 << 20


class DownloadError(CheckpointError):
    """A download failed, was cut too often, or its checksum or archive is wrong; names the URL or file."""


def cache_home() -> Path:
    """$TRAMONTANE_HOME, or ~/.cache/tramontane."""
    home = os.environ.get("TRAMONTANE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "tramontane"


def model_dir(name: str) -> Path:
    return cache_home() / "models" / name


def cached(name: str) -> Path | None:
    """The cached, verified folder of model `name`, or None."""
    folder = model_dir(name)
    return folder if folder.is_dir() else None


def resolve_model_name(path: str | Path) -> Path:
    """`path` itself when it exists; else, for a card's name, its cached folder.

    Raises:
        CheckpointError: a card's name whose model is not downloaded (the message says how to get it).
    """
    p = Path(path)
    if p.exists() or len(p.parts) != 1:
        return p
    try:
        card = find_card(str(path))
    except KeyError:
        return p  # neither a path nor a name: the caller reports the missing path
    folder = cached(card.name)
    if folder is None:
        raise CheckpointError(path, f"model card {card.name!r} is not downloaded: run `tramontane download "
                                    f"{card.name}` (into {model_dir(card.name)})")
    return _model_root(folder)


def download_card(card: Card, progress: bool | None = None) -> Path:
    """Download, verify and unpack `card`'s model into the cache (nothing to do when it is there)."""
    return fetch(card.url, card.name, md5=card.md5, sha256=card.sha256, archive=card.format == "tar",
                 tokenizer=card.tokenizer, progress=progress)


def fetch(url: str, name: str, *, md5: str | None = None, sha256: str | None = None, archive: bool = True,
          tokenizer: str | None = None, progress: bool | None = None, attempts: int = 5) -> Path:
    """Download `url` as model `name`, verify it, unpack a tar; the model's folder (at once when the
    cache already holds `name`).

    Raises:
        ValueError: no checksum given, or `name` is not a plain name.
        DownloadError: the server fails, the connection is cut `attempts` times, the checksum differs
            (the download is deleted), or the archive tries to write outside its folder.
    """
    if md5 is None and sha256 is None:
        raise ValueError("md5/sha256: a download must have a checksum to verify")
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    final = model_dir(name)
    if final.is_dir():
        return _model_root(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.parent / f"{name}.part"
    _download(url, part, attempts, sys.stderr.isatty() if progress is None else progress)
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want is not None and (got := _digest(part, algo)) != want.lower():
            part.unlink()
            raise DownloadError(url, f"{algo} is {got}, expected {want}: the download is deleted")
    staging = final.parent / f"{name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if archive:
            _extract(part, staging, url)
            part.unlink()
        else:
            part.rename(staging / PurePosixPath(url.split("?")[0]).name)
        if tokenizer is not None and not (_model_root(staging) / tokenizer).is_file():
            raise DownloadError(url, f"the download holds no tokenizer file {tokenizer}")
        staging.rename(final)
    except BaseException:  # a refused archive is deleted too: nothing half-made stays in the cache
        shutil.rmtree(staging, ignore_errors=True)
        part.unlink(missing_ok=True)
        raise
    return _model_root(final)


def _download(url: str, part: Path, attempts: int, progress: bool) -> None:
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # the server ignores ranges: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with part.open("ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=part.stem, disable=not progress
                ) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing past what we have: it was complete
                return
            raise DownloadError(url, f"HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # cut: resume from what arrived
            if isinstance(e, urllib.error.URLError) and not part.exists():
                raise DownloadError(url, f"cannot download: {e.reason}") from e
            continue
        if total is None or part.stat().st_size >= total:
            return
    raise DownloadError(url, f"connection cut {attempts} times; run the download again to resume from {part}")


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _extract(archive: Path, folder: Path, url: str) -> None:
    """Unpack a tar into `folder`, refusing any member that would land outside it."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name)
                if path.is_absolute() or ".." in path.parts:
                    raise DownloadError(url, f"archive member {m.name!r} points outside its folder; refused")
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(url, f"archive member {m.name!r} is a link or device; refused")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 checks once more
                tar.extractall(folder, members=members, filter="data")
            else:
                tar.extractall(folder, members=members)
    except tarfile.TarError as e:
        raise DownloadError(url, f"not a readable tar archive ({e})") from e


def _model_root(folder: Path) -> Path:
    """The folder itself, or its only entry when an archive wrapped the model in one folder."""
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
