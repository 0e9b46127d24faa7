"""Tiled MLP (issue 16): every supported family's MLP over token tiles equals the untiled model (loss, every gradient),
alone in fp64 and in the trainer with FSDP2 and SP=2 in fp32, where the parameter gradients are still reduced once."""

import copy

import pytest
import torch
from test_trainer import TINY as TRAINER_TINY
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ringtrain.model.causal_lm import decoder_layers
from ringtrain.model.tiled_mlp import TiledForward, tile_count, tile_mlp, untile_mlp
from ringtrain.testing import run_distributed

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=80, vocab_size=97, attention_dropout=0.0)
FAMILIES = {
    "llama": LlamaConfig(**COMMON),
    "mistral": MistralConfig(**COMMON, sliding_window=None),
    "qwen2": Qwen2Config(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=8),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_tiles", [3, 100])  # uneven tiles; more tiles than tokens (empty tiles)
def test_tiled_family_equals_untiled_fp64(family, n_tiles):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(FAMILIES[family], attn_implementation="sdpa").double().train()
    tiled = copy.deepcopy(ref)
    calls = []
    for layer in decoder_layers(tiled):
        tile_mlp(layer.mlp, n_tiles)
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    assert list(tiled.state_dict()) == list(ref.state_dict())  # names, hence checkpoints, unchanged
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 19), generator=g)  # 38 tokens over the tiles
    losses = [m(input_ids=ids, labels=ids).loss for m in (ref, tiled)]
    for loss in losses:
        loss.backward()
    assert calls == [1, 1]  # one module call per layer: hooks see the MLP once, the tiles run inside it
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), tiled.named_parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-13, msg=name)
    with torch.no_grad():  # the no-grad path tiles too, same values
        torch.testing.assert_close(tiled(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_tile_count_untile_and_refusal():
    assert (tile_count(4096, 1024), tile_count(4097, 1024), tile_count(3, 1024)) == (4, 5, 1)
    mlp = torch.nn.Linear(4, 4)
    tile_mlp(mlp, 3)
    assert isinstance(mlp.forward, TiledForward)
    untile_mlp(mlp)
    assert "forward" not in mlp.__dict__

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    pair = Pair()
    tile_mlp(pair, 2)
    with pytest.raises(TypeError, match=r"Pair\.forward returned tuple, not one tensor"):
        pair(torch.ones(4, 2, requires_grad=True))


# The trainer tests' tiny model and data, SP=2.
TINY = [*TRAINER_TINY, "parallel.sp_size=2"]


def _tiled_and_untiled(mesh, out_dir):
    """(loss, full gradients, reduce-scatters) of one forward/backward, untiled then tiled (+ recompute), same batch."""
    import torch.distributed as dist

    from ringtrain.train.trainer import build_trainer
    from ringtrain.validate import load_validated_config

    calls = [0]
    reduce_scatter = dist.reduce_scatter_single  # what FSDP2's reduce-scatter calls, counted here

    def counted(*args, **kwargs):
        calls[0] += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counted
    results = []
    for extra in ([], ["train.tiled_mlp=true", "train.mlp_tile_tokens=24"],
                  ["train.tiled_mlp=true", "train.mlp_tile_tokens=24", "train.activation_checkpointing=full"]):
        trainer = build_trainer(load_validated_config(None, [*TINY, f"train.output_dir={out_dir}", *extra]), mesh)
        calls[0] = 0
        loss = trainer.forward_backward([trainer.loader.dataset.batch([0, 1])])
        grads = {n: p.grad.full_tensor().detach().clone() for n, p in trainer.model.named_parameters()}
        results.append((loss, grads, calls[0]))
    dist.reduce_scatter_single = reduce_scatter
    return results


def test_tiled_mlp_with_fsdp2_and_sp2_equals_untiled(tmp_path):
    """fp32, FSDP2 over 2 ranks, SP=2 (64 local tokens x 2 sequences in tiles of 24: 6 tiles): the same loss and
    gradients as untiled within fp32 rounding, with and without recompute, and no more reduce-scatters (one per
    FSDP unit: 2 layers + the root)."""
    for rank_results in run_distributed(_tiled_and_untiled, 2, str(tmp_path), timeout=300):
        (ref_loss, ref, ref_calls), *tiled = rank_results
        assert ref_calls == 3
        for loss, grads, n_calls in tiled:
            assert n_calls == ref_calls
            assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
            for name, g in ref.items():
                err = (grads[name] - g).abs().max().item()
                assert err <= 1e-5 * g.abs().max().item(), f"{name}: {err:.2e} vs max {g.abs().max().item():.2e}"


def _cuda_mlp_step(tiled: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).train()
    if tiled:
        for layer in decoder_layers(model):
            tile_mlp(layer.mlp, 32)
    ids = torch.randint(0, 512, (1, 8192), generator=torch.Generator().manual_seed(1)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.float().item(), {n: p.grad.float() for n, p in model.named_parameters()}, \
        torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiled_mlp_on_cuda_bf16_matches_and_saves_the_mlp_activations():
    """bf16 on CUDA, no recompute: the same loss and gradients within bf16 rounding, and the peak lower by most of the
    4 layers x 4 [8192, 1024] bf16 MLP activations (64 MiB each layer)."""
    loss, ref, peak = _cuda_mlp_step(False)
    loss_t, got, peak_t = _cuda_mlp_step(True)
    assert abs(loss_t - loss) <= 1e-2 * abs(loss)
    for name, g in ref.items():
        assert (got[name] - g).abs().max() <= 3e-2 * g.abs().max(), name
    assert peak_t <= peak - 3 * 64 * 2**20, (peak, peak_t)


def test_a_family_without_an_mlp_submodule_is_refused():
    from ringtrain.model.build import apply_tiled_mlp
    from ringtrain.validate import load_validated_config

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block_sparse_moe = torch.nn.Linear(4, 4)  # Mixtral's name for its feed-forward

    class Model(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    cfg = load_validated_config(None, ["model.arch=llama", "train.output_dir=unused", "train.tiled_mlp=true"]).train
    with pytest.raises(ValueError, match=r"train\.tiled_mlp: Block has no 'mlp' submodule to tile .*"
                                         r"set train\.tiled_mlp=false for Model"):
        apply_tiled_mlp(Model(), cfg, sp_size=1)
    assert apply_tiled_mlp(Model(), load_validated_config(None, ["model.arch=llama", "train.output_dir=unused"]).train, 1) == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_tiled_moe_block_equals_untiled_and_the_balancing_loss_is_not_left_without_gradient(family):
    """An MoE block routes each token on its own, so its tiles are the block (fp32: the grouped expert matmul has no
    fp64 CPU kernel). With the balancing loss on, the router logits of a tiled block carry no gradient: refused."""
    from transformers import AutoConfig

    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**COMMON, "intermediate_size": 64}, num_local_experts=4,
                                  num_experts_per_tok=2, router_aux_loss_coef=0.0,
                                  **({"moe_intermediate_size": 24, "head_dim": 8} if family == "qwen3_moe" else {}))
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    tiled = copy.deepcopy(ref)
    for layer in decoder_layers(tiled):
        tile_mlp(layer.mlp, 3)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 20))
    labels, positions = torch.roll(ids, -1, 1), torch.arange(20).expand(2, -1)
    losses = []
    for model in (ref, tiled):
        loss = CausalLMWithChunkedLoss(model, 0)(ids, positions, labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(ref.named_parameters(), tiled.parameters(), strict=True):
        assert q.grad is not None, name
        err = float((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)  # relative to the gradient's largest entry (fp32 sums in another order)
    tiled.config.router_aux_loss_coef = 0.01
    with pytest.raises(ValueError, match="router logits carry no gradient .* set train.tiled_mlp=false"):
        CausalLMWithChunkedLoss(tiled, 0)(ids, positions, labels)
