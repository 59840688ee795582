"""Model cards and checked downloads, end to end against an HTTP server on 127.0.0.1 serving a tiny model's tar."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tramontane import ModelArgs, Transformer, load_model, save_model
from tramontane.cards import find_card, load_cards
from tramontane.download import DownloadError, fetch
from tramontane.errors import CheckpointError, ConfigError

from console import tramontane

ARGS = ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=64)


class Server:
    """Serves `files` (path -> bytes) with Range support; paths in `cut` lose their connection halfway once."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206 if asked else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    self.wfile.write(body[start: start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """An empty cache and config folder for this test only."""
    monkeypatch.setenv("TRAMONTANE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    (tmp_path / "config" / "tramontane" / "cards").mkdir(parents=True)
    return tmp_path / "cache", tmp_path / "config" / "tramontane" / "cards"


@pytest.fixture(scope="module")
def tiny_tar(tmp_path_factory) -> tuple[bytes, Transformer]:
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    folder = tmp_path_factory.mktemp("tiny-native")
    save_model(model, folder, to="native")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue(), model


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def test_resumes_after_a_cut_connection_and_loads_by_name(server, homes, tiny_tar) -> None:
    data, model = tiny_tar
    server.files["/tiny.tar"] = data
    server.cut.add("/tiny.tar")
    folder = fetch(server.url("/tiny.tar"), "tiny", md5=md5(data), progress=False)
    assert server.ranges[0] is None and server.ranges[1] == f"bytes={len(data) // 2}-"
    assert leftovers(homes[0]) == ["tiny"] and (folder / "params.json").is_file()
    tokens = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(tokens), model(tokens))


def test_wrong_checksum_is_refused_and_nothing_is_left(server, homes, tiny_tar) -> None:
    data, _ = tiny_tar
    server.files["/tiny.tar"] = data
    with pytest.raises(DownloadError, match="md5 is .* expected 0{32}"):
        fetch(server.url("/tiny.tar"), "tiny", md5="0" * 32, progress=False)
    assert leftovers(homes[0]) == []
    with pytest.raises(DownloadError, match="sha256"):
        fetch(server.url("/tiny.tar"), "tiny", sha256="f" * 64, progress=False)
    assert leftovers(homes[0]) == []


def evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = b"owned"
        info = tarfile.TarInfo({"dotdot": "../../escaped.txt", "absolute": "/tmp/tramontane-escaped.txt",
                                "symlink": "link", "hardlink": "hard"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "../../outside"
        info.size = len(payload) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_archive_writing_outside_its_folder_is_refused(server, homes, tmp_path, kind: str) -> None:
    data = evil_tar(kind)
    server.files["/evil.tar"] = data
    with pytest.raises(DownloadError, match="refused"):
        fetch(server.url("/evil.tar"), "evil", md5=md5(data), progress=False)
    assert leftovers(homes[0]) == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/tramontane-escaped.txt").exists()
    assert not (homes[0] / "models" / "evil").exists()


def test_builtin_cards_and_a_user_override(server, homes, tiny_tar) -> None:
    data, model = tiny_tar
    builtin = find_card("mistral-7b-instruct-v0.3")
    assert builtin.md5 == "80b71fcb6416085bcb4efad86dfb4d52" and builtin.preset == "mistral-7b-v0.3"
    assert find_card("mistral_7b").name == "mistral-7b-v0.1"
    with pytest.raises(CheckpointError, match="tramontane download mistral-7b-v0.1"):
        load_model("mistral_7b")  # known, not downloaded: says how to get it
    server.files["/mirror/tiny.tar"] = data
    (homes[1] / "mine.yaml").write_text(
        f"- name: mistral-7b-v0.1@user\n  url: {server.url('/mirror/tiny.tar')}\n  md5: {md5(data)}\n  tokenizer: null\n")
    card = find_card("mistral-7b-v0.1")
    assert card.url.endswith("/mirror/tiny.tar") and card.preset == "mistral-7b-v0.1"  # the rest inherited
    run = tramontane("download", "mistral_7b")
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == homes[0] / "models" / "mistral-7b-v0.1"
    tokens = torch.tensor([[2, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(load_model("mistral_7b")(tokens), model(tokens))
    listing = tramontane("models")
    line = next(x for x in listing.stdout.splitlines() if x.startswith("mistral-7b-v0.1 "))
    assert "cached" in line and "not downloaded" not in line


def test_bad_user_cards_name_the_file(homes) -> None:
    (homes[1] / "bad.yaml").write_text("- name: mistral-7b-v0.1\n  url: http://x/y.tar\n  md5: " + "a" * 32 + "\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*mistral-7b-v0.1@user"):
        load_cards()
    (homes[1] / "bad.yaml").write_text("- name: mine\n  url: http://x/y.tar\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*checksum"):
        load_cards()
    (homes[1] / "bad.yaml").write_text("- name: nothing@user\n  url: http://x/y.tar\n  md5: " + "a" * 32 + "\n")
    with pytest.raises(ConfigError, match="no built-in card"):
        load_cards()


def test_download_command_offline_and_url_checks(server, homes, tiny_tar) -> None:
    data, _ = tiny_tar
    server.files["/tiny.tar"] = data
    url = server.url("/tiny.tar")
    no_sum = tramontane("download", url)
    assert no_sum.returncode == 1 and "--md5" in no_sum.stderr
    offline = tramontane("download", url, "--offline")
    assert offline.returncode == 1 and "--offline" in offline.stderr and server.ranges == []
    ok = tramontane("download", url, "--md5", md5(data))
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()) == homes[0] / "models" / "tiny"
    requests = len(server.ranges)
    again = tramontane("download", url, "--md5", md5(data))
    assert again.returncode == 0 and again.stdout == ok.stdout and len(server.ranges) == requests  # cached
