"""The exported folder agrees with its tokenizer: config.json and generation_config.json name the tokenizer's own
bos / eos / pad ids, not the model family's defaults (Llama's eos=2 is the byte tokenizer's <unk>)."""

from __future__ import annotations

import json

import pytest
import torch
from chat_tokenizers import save_chat_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

from ringtrain.data import build_tokenizer
from ringtrain.model.weights import export_hf_folder


@pytest.mark.parametrize("family", ["bytes", "llama3"])
def test_export_names_the_tokenizers_special_tokens(tmp_path, family):
    tokenizer = build_tokenizer("bytes") if family == "bytes" else \
        AutoTokenizer.from_pretrained(save_chat_tokenizer(family, tmp_path / "tok"))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=max(len(tokenizer), 384), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    assert (lm.config.bos_token_id, lm.config.eos_token_id) == (1, 2)  # Llama's defaults
    out = tmp_path / "final_model"
    export_hf_folder(lm, out, tokenizer)
    want = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    if family == "bytes":
        assert want == {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}
    for name in ("config.json", "generation_config.json"):
        data = json.loads((out / name).read_text())
        assert {k: data.get(k) for k in want} == want, name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.generation_config.eos_token_id == GenerationConfig.from_pretrained(out).eos_token_id \
        == AutoTokenizer.from_pretrained(out).eos_token_id
    # generate() stops at the tokenizer's EOS: force it as the first new token.
    with torch.no_grad():
        loaded.lm_head.weight.zero_()
        loaded.lm_head.weight[tokenizer.eos_token_id] = 1.0
        loaded.model.norm.weight.fill_(1.0)
        prompt = torch.tensor([[5, 6, 7]])
        hidden = loaded.model(prompt).last_hidden_state[0, -1]
        loaded.lm_head.weight[tokenizer.eos_token_id] = hidden.sign() * 10
        out_ids = loaded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out_ids[0, 3:].tolist() == [tokenizer.eos_token_id]


def test_tokenizer_auto_is_the_models_own(tmp_path, caplog):
    from ringtrain.data.tokenizer import tokenizer_name

    folder = save_chat_tokenizer("qwen2", tmp_path / "model")
    assert tokenizer_name("auto", folder) == folder
    assert tokenizer_name("auto", None) == "bytes"
    assert tokenizer_name("auto", "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub name: its own tokenizer
    assert tokenizer_name("bytes", folder) == "bytes" and tokenizer_name(folder, None) == folder
    bare = tmp_path / "bare"
    bare.mkdir()
    with caplog.at_level("WARNING"):
        assert tokenizer_name("auto", str(bare)) == "bytes"
    assert any("holds no tokenizer files: using the byte tokenizer" in m for m in caplog.messages)
    assert len(build_tokenizer(tokenizer_name("auto", folder))) == 400
