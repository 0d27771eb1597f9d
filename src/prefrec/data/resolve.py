"""Find a dataset by path, relative name or short alias; download a known one if missing.

``resolve_dataset("ml1m-eval")`` looks for ``dmpo/rec_data_ml_1m_eval_ranking.json`` in,
in order:

1. the argument itself, when it is an existing path;
2. ``data_dir``;
3. ``$PREFREC_DATA``;
4. ``../shared/data`` relative to the working directory, then relative to the repository;
5. the download cache (``$PREFREC_CACHE``, else ``~/.cache/prefrec/data``);

and otherwise downloads it from the paper's public repository into the cache, checking
its sha256. ``$PREFREC_DATA_URL`` (or ``base_url=``) replaces the download source with a
mirror laid out like ``../shared/data`` (``{base}/dmpo/...``, ``{base}/sdpo-lastfm/...``);
``http(s)://`` and ``file://`` URLs both work.

Aliases are ``{dataset}-{split}``: dataset ``ml1m`` | ``movie`` (Amazon Movies and TV) |
``game`` (Amazon Video Games), split ``sft`` | ``dpo-1`` ... ``dpo-5`` | ``eval``; plus
``lastfm`` (S-DPO LastFM validation) and ``ml100k-ratings`` / ``ml100k-items``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from prefrec.errors import PrefrecError
from prefrec.io import atomic_open

# sha256 of the released files, computed from the copies shipped in ../shared/data.
SHA256: dict[str, str] = {
    "dmpo/rec_Amazon_Game_dpo_ranking_1.json": "93f6ca70467b94f33c6f6a5ef03d9818c1a8c970cb869f98b0e0f9b2b6ca3660",
    "dmpo/rec_Amazon_Game_dpo_ranking_2.json": "a27cee554a8f9c476206ef90d9b1b5f775662d5a99051bfe035aa420a231935b",
    "dmpo/rec_Amazon_Game_dpo_ranking_3.json": "a18323461c2904c924e47a0eba758ddff62a851cc697d8ace4cacfb5b6fdbc4c",
    "dmpo/rec_Amazon_Game_dpo_ranking_4.json": "51049c1c15b93a2e32d59f06ca5bea97f3c8c7d10e0597e7ba9f89707bdbe39b",
    "dmpo/rec_Amazon_Game_dpo_ranking_5.json": "ec063794821fc22dddbb72f5a4e35f35aca0293ac4678c20e07cb21c48e1732a",
    "dmpo/rec_Amazon_Game_eval_ranking.json": "7d1251ee08160808201ed7b5395d1c112ab26c7e7d87f5374a8c2698d5820bb5",
    "dmpo/rec_Amazon_Game_sft_ranking.json": "e955c36223f45de0e60211003a3585d1d4bd903f6d53198beefb60e3d96a5f76",
    "dmpo/rec_Amazon_Movie_dpo_ranking_1.json": "6127ae521b36b7d1d7c8dc068227bcf75178adb35dd0be8ae4d60b3b5809492b",
    "dmpo/rec_Amazon_Movie_dpo_ranking_2.json": "231295116457fd0aebf23eab5c7d7516bbb9498880b67345c089d579f27e7e2d",
    "dmpo/rec_Amazon_Movie_dpo_ranking_3.json": "75225f2d8d357a2a1fbf6d5f48dc33c825e4790b6530092115222f2ef6e3d16f",
    "dmpo/rec_Amazon_Movie_dpo_ranking_4.json": "818251859baf14652d34ca1c833e8eae2a4b8a4086ff97fb6cc2be28bfdd683b",
    "dmpo/rec_Amazon_Movie_dpo_ranking_5.json": "ee6025f10ee33d44221f3b36f391d2637d4734cb791814706b390cc1a3afcfcb",
    "dmpo/rec_Amazon_Movie_eval_ranking.json": "b2edd54cc856b4254479ad3bcbf59213740c7f192c0b6e940daba449b79cc70c",
    "dmpo/rec_Amazon_Movie_sft_ranking.json": "5dfafd200c0def98fda1e5ed0518cdf229b293689d6258957d8ad8c610546dbe",
    "dmpo/rec_data_ml_1m_dpo_ranking_1.json": "4439db8ab401d1ea195b2aed3df8cfa513152147ec0084ba024d429048b951d1",
    "dmpo/rec_data_ml_1m_dpo_ranking_2.json": "a86d78f6c40c93a57e6faba7130395afba32f577222d8178dece896fecb708cd",
    "dmpo/rec_data_ml_1m_dpo_ranking_3.json": "90059a61d8454bd1d445af14386898c15c501bd43a893499c76e3f29b39f1465",
    "dmpo/rec_data_ml_1m_dpo_ranking_4.json": "370f9b6d6a9a96e489972ff325ff99aa50f7ab628f4bc3c4369ca8acd9d0b2b3",
    "dmpo/rec_data_ml_1m_dpo_ranking_5.json": "a0dfb4d47bf7534cbac368e817930f44a2f4029ed92d10567794ed78e9b8ad6e",
    "dmpo/rec_data_ml_1m_eval_ranking.json": "6e6a2503bd46a566000d9e859fde71904408428d2b5eebf49407a9ae375646b0",
    "dmpo/rec_data_ml_1m_sft_ranking.json": "d28d2dd6ee5a55ae931440f83783be8f351c7a45441342e5d992c12d66d05157",
    "sdpo-lastfm/lastfm-val.json": "4fe1044f3c95eb77d402d0fc2d1b513bf3a585225c344b8f84c23b1c3f3007a4",
    "ml-100k/u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "ml-100k/u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
}

# Where each collection comes from: (raw-file URL base, path of the file under it given
# its name). The URLs pin the commits that a code-search index shows holding these files
# (the DMPO file sizes match the shipped ones); they could not be fetched from this
# offline machine, so they are unverified. MovieLens-100K is only distributed as a zip
# archive, so it has no per-file source: put ml-100k/ in $PREFREC_DATA.
SOURCES: dict[str, str] = {
    "dmpo": "https://raw.githubusercontent.com/BZX667/DMPO/"
    "4f88f6fbbbcd29c9b7dd0d59515bd468ce60eaf3/data",
    "sdpo-lastfm": "https://raw.githubusercontent.com/chenyuxin1999/S-DPO/"
    "944993aa159f63b5308ade9e38f29c81c7820cb2/data/lastfm-sft-cans20",
}

_DMPO_DATASETS = {"ml1m": "data_ml_1m", "movie": "Amazon_Movie", "game": "Amazon_Game"}
_DMPO_SPLITS = {"sft": "sft_ranking", "eval": "eval_ranking"} | {
    f"dpo-{k}": f"dpo_ranking_{k}" for k in range(1, 6)
}
ALIASES: dict[str, str] = {
    f"{short}-{split}": f"dmpo/rec_{long}_{suffix}.json"
    for short, long in _DMPO_DATASETS.items()
    for split, suffix in _DMPO_SPLITS.items()
} | {
    "lastfm": "sdpo-lastfm/lastfm-val.json",
    "lastfm-val": "sdpo-lastfm/lastfm-val.json",
    "ml100k": "ml-100k",
    "ml100k-ratings": "ml-100k/u.data",
    "ml100k-items": "ml-100k/u.item",
}

DOWNLOAD_TIMEOUT_S = 60
# The repository's ../shared/data (this file is src/prefrec/data/resolve.py).
REPO_SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def relative_name(name: str) -> str:
    """The path under a data folder that a name stands for: an alias, a bare released
    file name (``rec_data_ml_1m_sft_ranking.json``) or a relative path as given."""
    if name in ALIASES:
        return ALIASES[name]
    by_file_name = {Path(rel).name: rel for rel in SHA256}
    return by_file_name.get(name, name)


def cache_dir() -> Path:
    """``$PREFREC_CACHE`` or ``~/.cache/prefrec/data``: where downloads are kept."""
    env = os.environ.get("PREFREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prefrec" / "data"


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The local folders searched, in order (the cache last)."""
    dirs = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get("PREFREC_DATA"):
        dirs.append(Path(os.environ["PREFREC_DATA"]))
    dirs += [Path.cwd().parent / "shared" / "data", REPO_SHARED_DATA, cache_dir()]
    return dirs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_url(rel: str, base_url: str | None = None) -> str:
    """The URL of a known file: under a mirror base (same layout as ../shared/data) when
    ``base_url`` or ``$PREFREC_DATA_URL`` is set, else under its paper's repository."""
    base = base_url or os.environ.get("PREFREC_DATA_URL")
    if base:
        return f"{base.rstrip('/')}/{rel}"
    collection, _, file_name = rel.partition("/")
    if collection not in SOURCES:
        raise PrefrecError(
            f"{rel} has no download source; put the file in $PREFREC_DATA or pass a path"
        )
    return f"{SOURCES[collection]}/{file_name}"


def download_file(rel: str, base_url: str | None = None) -> Path:
    """Download a known file into the cache, atomically; a sha256 mismatch keeps nothing."""
    url = download_url(rel, base_url)
    target = cache_dir() / rel
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with atomic_open(target, "wb") as fh:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    fh.write(block)
                if digest.hexdigest() != SHA256[rel]:
                    # Raising inside atomic_open removes the temporary file.
                    raise PrefrecError(
                        f"downloaded {rel} from {url} but its sha256 {digest.hexdigest()} is "
                        f"not the expected {SHA256[rel]}; nothing was kept"
                    )
    # URLError covers HTTP errors, OSError timeouts and resets, HTTPException a cut-off
    # transfer, ValueError a malformed URL.
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        # HTTPError's str() carries the status code; URLError's reason is the cause.
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
        raise PrefrecError(
            f"could not download {rel} from {url}: {reason}; "
            "put the file in $PREFREC_DATA or pass a path"
        ) from None
    return target


def resolve_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    download: bool = True,
    base_url: str | None = None,
) -> Path:
    """The local path of a dataset file (or folder), downloading a known file if needed.

    See the module docstring for the lookup order. Raises :class:`PrefrecError` (one
    line) when the dataset cannot be found or fetched.
    """
    given = Path(name_or_path).expanduser()
    if given.exists():
        return given
    rel = relative_name(str(name_or_path))
    looked = []
    for folder in search_dirs(data_dir):
        candidate = folder / rel
        if candidate.exists():
            if candidate.is_file() and folder == cache_dir() and rel in SHA256:
                if sha256_of(candidate) != SHA256[rel]:
                    continue  # a corrupted cache entry is fetched again below
            return candidate
        looked.append(str(folder))
    if rel not in SHA256:
        known = ", ".join(sorted(ALIASES))
        raise PrefrecError(
            f"dataset {name_or_path!r} not found (looked in {', '.join(looked)}) and it is "
            f"not a known download; known names: {known}"
        )
    if not download:
        raise PrefrecError(
            f"dataset {name_or_path!r} not found (looked in {', '.join(looked)}) and "
            "downloading is off; put the file in $PREFREC_DATA or pass a path"
        )
    return download_file(rel, base_url)
