"""Real chat tokenizers built in the test, offline: a byte-level BPE trained with the `tokenizers` library on the
shipped samples, with the special tokens and the chat template of a popular model family (Qwen2's ChatML, Llama 3)."""

from __future__ import annotations

import json
from pathlib import Path

from ringtrain.data.files import SAMPLES

# Qwen2-Instruct's chat template (ChatML, with its default system prompt).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FAMILIES = {
    "qwen2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>",
                  bos=None, template=QWEN2_TEMPLATE),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], eos="<|eot_id|>", pad="<|end_of_text|>", bos="<|begin_of_text|>",
                   template=LLAMA3_TEMPLATE),
}


def sample_texts() -> list[str]:
    texts = []
    for line in Path(SAMPLES, "chat.jsonl").read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def save_chat_tokenizer(family: str, folder: Path, vocab_size: int = 400) -> str:
    """Train a small byte-level BPE, give it `family`'s special tokens and template, save it; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(sample_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=spec["eos"], pad_token=spec["pad"],
                                  bos_token=spec["bos"], chat_template=spec["template"])
    tok.save_pretrained(folder)
    return str(folder)
