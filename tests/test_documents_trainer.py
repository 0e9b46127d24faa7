"""The trainer's loss path on a packed batch (issue 7): with document ids, the summed loss of a packed sequence is
the sum of its documents' losses run one by one; without them attention leaks across documents (the old bug)."""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

from ringtrain.data import pack_documents
from ringtrain.hf import apply_ring_attention, shard_batch
from ringtrain.train.trainer import CausalLMWithChunkedLoss

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=64, attention_dropout=0.0,
              use_sliding_window=True, sliding_window=6, max_window_layers=1)
EOS, PAD = 1, 0


def test_packed_loss_equals_documents_one_by_one():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 64, n) for n in (9, 1, 14, 5)]  # with EOS: 10 + 2 + 15 + 6 = 33 tokens
    packed = pack_documents(docs, seq_len=40, eos_id=EOS, pad_id=PAD)  # 33 tokens: one sequence, input order
    batch = packed.batch([0])  # right padding after the last document, its own document id
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(Qwen2Config(**COMMON), attn_implementation="sdpa")
    expected, n_tokens = 0.0, 0
    with torch.no_grad():
        for d in docs:
            alone = torch.tensor([*d.tolist(), EOS])[None]
            logits = ref(input_ids=alone).logits[0]
            expected += float(F.cross_entropy(logits[:-1], alone[0, 1:], reduction="sum"))
            n_tokens += alone.shape[1] - 1

    lm = apply_ring_attention(ref)  # a world of one: the same ring code path and input hook
    model = CausalLMWithChunkedLoss(lm, chunk_tokens=16)
    local = shard_batch(batch, document_positions="restart")
    assert int(local["num_label_tokens"]) == n_tokens
    with torch.no_grad():
        got = float(model(local["input_ids"], local["position_ids"], local["shift_labels"], None,
                          local["document_ids"]))
        leaky = float(model(local["input_ids"], shard_batch(batch, document_positions="global")["position_ids"],
                            local["shift_labels"]))
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)
    # The token-weighted mean over documents is then got / n_tokens, as forward_backward divides.
    assert abs(leaky - expected) > 1e-3 * abs(expected)  # without document ids, documents see each other
