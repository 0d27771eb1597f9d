"""Dataset lookup order, aliases, and checked downloads from a local server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading

import pytest

from prefrec.data import resolve
from prefrec.data.resolve import (
    ALIASES,
    SHA256,
    download_url,
    relative_name,
    resolve_dataset,
)
from prefrec.errors import PrefrecError

SFT = "dmpo/rec_data_ml_1m_sft_ranking.json"


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    """No real data anywhere: cwd, repo, env and cache all point into tmp_path."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # so ../shared/data is tmp_path/shared/data
    monkeypatch.setattr(resolve, "REPO_SHARED_DATA", tmp_path / "repo-shared")
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFREC_DATA", raising=False)
    monkeypatch.delenv("PREFREC_DATA_URL", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy must not see the test server
    return tmp_path


def place(folder, rel=SFT, text="x"):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def serve(tmp_path):
    """``serve(folder)`` -> base URL of an HTTP server on 127.0.0.1 serving ``folder``."""
    servers = []

    def start(folder):
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def mirror_of(shared_data, folder, rel=SFT, corrupt=False):
    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_data / rel, target)
    if corrupt:
        target.write_bytes(target.read_bytes().replace(b"Tarzan", b"Tarzen", 1))
    return folder


def test_sha256_table_matches_the_shipped_files(shared_data):
    for rel, digest in SHA256.items():
        assert hashlib.sha256((shared_data / rel).read_bytes()).hexdigest() == digest, rel


def test_aliases_are_consistent_and_name_known_files(shared_data):
    assert relative_name("ml1m-eval") == "dmpo/rec_data_ml_1m_eval_ranking.json"
    assert relative_name("ml1m-dpo-3") == "dmpo/rec_data_ml_1m_dpo_ranking_3.json"
    assert relative_name("ml1m-sft") == SFT
    assert relative_name("game-eval") == "dmpo/rec_Amazon_Game_eval_ranking.json"
    assert relative_name("movie-dpo-1") == "dmpo/rec_Amazon_Movie_dpo_ranking_1.json"
    assert relative_name("lastfm") == "sdpo-lastfm/lastfm-val.json"
    assert (
        relative_name("rec_Amazon_Game_sft_ranking.json") == "dmpo/rec_Amazon_Game_sft_ranking.json"
    )
    assert relative_name("my/own.json") == "my/own.json"
    assert len([a for a in ALIASES if a.split("-")[0] in ("ml1m", "movie", "game")]) == 21
    for rel in ALIASES.values():
        assert (shared_data / rel).exists(), rel


def test_real_shared_data_is_found_relative_to_the_repository(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFREC_DATA", raising=False)
    path = resolve_dataset("lastfm", download=False)
    assert path.resolve() == (shared_data / "sdpo-lastfm" / "lastfm-val.json").resolve()


def test_existing_path_wins(isolated):
    mine = place(isolated, "mine.json")
    assert resolve_dataset(str(mine)) == mine
    assert resolve_dataset(mine) == mine


def test_lookup_order(isolated, monkeypatch):
    data_dir, env_dir = isolated / "data-dir", isolated / "env"
    monkeypatch.setenv("PREFREC_DATA", str(env_dir))
    order = [
        place(data_dir),
        place(env_dir),
        place(isolated / "shared" / "data"),  # ../shared/data from the cwd
        place(isolated / "repo-shared"),
        place(isolated / "cache", text="stale copy, wrong sha256"),
    ]
    for expected in order[:-1]:
        assert resolve_dataset("ml1m-sft", data_dir=data_dir, download=False) == expected
        expected.unlink()
    # a cache entry whose checksum is wrong is not trusted
    with pytest.raises(PrefrecError, match="downloading is off"):
        resolve_dataset("ml1m-sft", data_dir=data_dir, download=False)
    # ... but an unknown file in a data folder is returned as is
    own = place(env_dir, "own/file.json")
    assert resolve_dataset("own/file.json") == own


def test_download_from_local_server_is_checked_and_cached(isolated, shared_data, serve):
    base = serve(mirror_of(shared_data, isolated / "mirror"))
    path = resolve_dataset("ml1m-sft", base_url=base)
    assert path == isolated / "cache" / SFT
    assert path.read_bytes() == (shared_data / SFT).read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # found in the cache next time, with no server needed
    assert resolve_dataset("ml1m-sft", base_url="http://127.0.0.1:9/none") == path


def test_download_url_from_environment_and_file_url(isolated, shared_data, monkeypatch):
    mirror = mirror_of(shared_data, isolated / "mirror", "sdpo-lastfm/lastfm-val.json")
    monkeypatch.setenv("PREFREC_DATA_URL", mirror.as_uri())
    path = resolve_dataset("lastfm")
    assert path == isolated / "cache" / "sdpo-lastfm" / "lastfm-val.json"
    assert path.read_bytes() == (shared_data / "sdpo-lastfm" / "lastfm-val.json").read_bytes()


def test_checksum_mismatch_keeps_nothing(isolated, shared_data, serve):
    base = serve(mirror_of(shared_data, isolated / "mirror", corrupt=True))
    with pytest.raises(PrefrecError) as info:
        resolve_dataset("ml1m-sft", base_url=base)
    message = str(info.value)
    assert f"downloaded {SFT} from {base}/{SFT} but its sha256" in message
    assert f"is not the expected {SHA256[SFT]}; nothing was kept" in message
    cache = isolated / "cache" / "dmpo"
    assert not cache.exists() or not any(cache.iterdir())


def test_unreachable_url_gives_one_clear_line(isolated):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(PrefrecError) as info:
        resolve_dataset("ml1m-sft", base_url=base)
    message = str(info.value)
    assert message.startswith(f"could not download {SFT} from {base}/{SFT}: ")
    assert "refused" in message.lower()
    assert message.endswith("; put the file in $PREFREC_DATA or pass a path")
    assert "\n" not in message


def test_missing_file_on_server_names_the_http_status(isolated, serve):
    base = serve(isolated)  # serves a folder without the file
    with pytest.raises(PrefrecError, match=r"could not download .* HTTP Error 404"):
        resolve_dataset("game-eval", base_url=base)


def test_unknown_name_and_files_without_download_source(isolated):
    with pytest.raises(PrefrecError, match=r"dataset 'no-such' not found .* known names: .*lastfm"):
        resolve_dataset("no-such")
    with pytest.raises(PrefrecError, match="ml-100k/u.data has no download source"):
        resolve_dataset("ml100k-ratings")


def test_default_sources_are_the_papers_repositories(monkeypatch):
    monkeypatch.delenv("PREFREC_DATA_URL", raising=False)
    assert download_url(SFT).startswith("https://raw.githubusercontent.com/BZX667/DMPO/")
    assert download_url(SFT).endswith("/data/rec_data_ml_1m_sft_ranking.json")
    assert download_url("sdpo-lastfm/lastfm-val.json").startswith(
        "https://raw.githubusercontent.com/chenyuxin1999/S-DPO/"
    )
    assert download_url("sdpo-lastfm/lastfm-val.json").endswith(
        "/data/lastfm-sft-cans20/lastfm-val.json"
    )
    assert download_url(SFT, base_url="http://mirror/x/") == f"http://mirror/x/{SFT}"
