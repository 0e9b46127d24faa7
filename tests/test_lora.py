"""LoRA through peft: the same training at SP=1, SP=2 (ring) and SP=2 (Ulysses); gradients only where training is;
adapter checkpoints; the exported adapter and merged model reproduce the trained logits in a fresh process; bad
inputs are one line each."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringtrain.errors import ConfigError
from ringtrain.testing import finish, run_distributed, run_metrics, start_torchrun, wait_for_steps
from ringtrain.validate import load_validated_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "data.source=passkey", "data.num_samples=32", "data.passkey_min_tokens=90", "train.micro_batch_size=2",
    "train.seq_len=128", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=0", "logging.progress_bar=false",
    "peft.method=lora", "peft.r=4", "peft.alpha=8", "checkpoint.export_final=false",
]
STEPS = 5


def _cfg(tmp, *overrides):
    return load_validated_config(None, [*TINY, f"train.output_dir={tmp}", *overrides])


def _is_trained(name: str) -> bool:
    """Adapters, the token embeddings and the norms (the default peft.trainable_modules)."""
    return ".lora_A." in name or ".lora_B." in name or "embed_tokens" in name or "norm" in name


def _train(dims, cfg):
    """(losses of STEPS steps, the first step's gradients of every parameter by name: None where there is none)."""
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, dims)
    grads = {}

    def snapshot(*_):
        if not grads:
            for name, p in trainer.model.named_parameters():
                g = p.grad
                grads[name] = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()

    trainer.optimizer.register_step_pre_hook(snapshot)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    n_state = len(trainer.optimizer.state)  # parameters holding AdamW moments
    return losses, grads, n_state


def _train_each(dims, *cfgs):
    return [_train(dims, cfg) for cfg in cfgs]


def _ring_ulysses_and_combined(dims, cfg_ring, cfg_ulysses, cfg_combined):
    from ringtrain.config import ParallelConfig
    from ringtrain.parallel import ParallelDims

    ulysses_dims = ParallelDims.build(ParallelConfig(sp_size=2, ulysses_size=2), device=dims.device)
    return _train(dims, cfg_ring), _train(ulysses_dims, cfg_ulysses), _train(dims, cfg_combined)


def _compare(ref, got, rtol):
    (ref_losses, ref_grads, _), (losses, grads, _) = ref, got
    for a, b in zip(ref_losses, losses, strict=True):
        assert math.isclose(a, b, rel_tol=rtol), (ref_losses, losses)
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), name
        if g is not None:
            err, scale = (grads[name] - g).abs().max().item(), g.abs().max().item()
            assert err <= rtol * max(scale, 1e-6), f"{name}: max err {err:.3e} vs max |grad| {scale:.3e}"


# Adapters on every linear layer (inside the tiled MLP too), recompute, activation offload, the balanced layout and
# several packed documents per sequence.
COMBINED = ["peft.target_modules=[all-linear]", "train.tiled_mlp=true", "train.mlp_tile_tokens=16",
            "train.activation_checkpointing=true", "train.offload_activations=true", "parallel.layout=balanced",
            "train.seq_len=256", "data.passkey_min_tokens=80", "data.passkey_max_tokens=120"]


def test_lora_sp_ring_ulysses_equal_single_process(tmp_path):
    """5 steps of LoRA at SP=1, SP=2 ring and SP=2 Ulysses (FSDP2 over the SP ranks): the same losses and adapter
    gradients; gradients and optimizer state only on the adapters, embeddings and norms. With every linear layer
    adapted, tiled MLP, recompute, offload, the balanced layout and packed documents at SP=2: the same again."""
    ref, ref_combined = run_distributed(_train_each, 1, _cfg(tmp_path / "a", "train.fsdp=false"),
                                        _cfg(tmp_path / "a2", "train.fsdp=false", COMBINED[0], *COMBINED[-3:]),
                                        timeout=300)[0]
    losses, grads, n_state = ref
    assert losses[-1] < losses[0]  # it trains
    for name, g in grads.items():
        assert (g is not None) == _is_trained(name), name  # frozen weights have no gradient at all
        if g is not None and ".lora_A." not in name:  # B = 0 at step 1: A's gradient is 0 then
            assert g.abs().max() > 0, name
    assert n_state == sum(_is_trained(n) for n in grads)  # AdamW state only for what trains
    assert any(".mlp.down_proj.lora_B." in n for n in ref_combined[1])
    ring, ulysses, combined = run_distributed(
        _ring_ulysses_and_combined, 2, _cfg(tmp_path / "b", "parallel.sp_size=2"),
        _cfg(tmp_path / "c", "parallel.sp_size=2", "parallel.ulysses_size=2"),
        _cfg(tmp_path / "d", "parallel.sp_size=2", *COMBINED), timeout=400)[0]
    _compare(ref, ring, 1e-4)
    _compare(ref, ulysses, 1e-4)
    _compare(ref_combined, combined, 1e-4)


# --------------------------------------------------------------------------------------------------
# Export and evaluation of an adapter, and the inputs refused before any rank trains


def _base_folder(path, seed, tied=False):
    """A tiny Llama saved as a plain transformers folder (the base model LoRA adapts)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)).save_pretrained(path)
    return str(path)


def _train_and_export(dims, cfg, out, evaluate=False):
    """Train 3 steps, export (adapter + merged); the trained tensors in full (rank 0: what the reference loads), and
    with `evaluate` those of the model `ringtrain eval` builds with model.adapter on this mesh."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, dims)
    for _ in range(3):
        trainer.train_step()
    trainer.export(Path(out))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = get_model_state_dict(trainer.lm, options=options)
    if not evaluate:
        return trained
    # `ringtrain eval`'s loader on this mesh: the adapter's tensors land in the sharded eval model.
    import dataclasses

    from ringtrain.eval.entry import load_model_for_eval

    eval_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=str(out)))
    model, _ = load_model_for_eval(eval_cfg, dims)
    return trained, get_model_state_dict(model.lm, options=options)


FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
base, adapter, merged, ids, out = sys.argv[1:]
x = torch.load(ids)
with torch.no_grad():
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.save({"peft": model(x).logits, "merged": plain(x).logits}, out)
"""


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_exported_adapter_and_merged_model_reproduce_the_trained_logits(tmp_path):
    """LoRA at SP=2 (FSDP2) exports a peft folder; in a fresh process `PeftModel.from_pretrained(base, folder)` and the
    merged folder give the trained model's logits (rel 1e-5), and `ringtrain eval`'s loader with model.adapter too."""
    from ringtrain.eval.entry import load_model_for_eval
    from ringtrain.model.build import build_model

    base = _base_folder(tmp_path / "base", 0)
    overrides = [f"model.path={base}", "model.arch=null", "model.config={}", "parallel.sp_size=2",
                 "checkpoint.export_merged=true", "peft.target_modules=[q_proj, v_proj, down_proj]"]
    cfg = _cfg(tmp_path / "run", *overrides)
    out = tmp_path / "run" / "final_model"
    trained, evaluated_sp = run_distributed(_train_and_export, 2, cfg, str(out), True, timeout=300)[0]
    assert evaluated_sp.keys() == trained.keys()
    assert all(torch.equal(evaluated_sp[k], trained[k]) for k in trained)
    assert {"adapter_config.json", "adapter_model.safetensors", "base_model.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))  # no base weights in an adapter folder
    # The trained model in one process: the base from its folder, the trained tensors over it.
    model = build_model(cfg, None, "eval")
    assert not model.lm.load_state_dict(trained, strict=False).unexpected_keys
    x = torch.randint(0, 384, (2, 96))
    with torch.no_grad():
        reference = model.lm(x).logits
    torch.save(x, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH, base, str(out), str(out) + "_merged", str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=300)
    fresh = torch.load(tmp_path / "logits.pt")
    assert _rel(fresh["peft"], reference) < 1e-5, _rel(fresh["peft"], reference)
    assert _rel(fresh["merged"], reference) < 1e-5, _rel(fresh["merged"], reference)
    # The adapter changed the model: its logits are not the base model's.
    with torch.no_grad():
        plain = build_model(_cfg(tmp_path / "plain", *overrides[:3]), None, "eval").lm(x).logits
    assert _rel(plain, reference) > 1e-3
    evaluated, _ = load_model_for_eval(_cfg(tmp_path / "eval", *overrides[:3], f"model.adapter={out}"), None)
    with torch.no_grad():
        assert _rel(evaluated.lm(x).logits, reference) < 1e-5


def test_tied_embeddings_export(tmp_path):
    """A tied output head trains with the embedding: the adapter folder saves it as a module of its own, so peft's
    copy of the trained embedding does not leave the head behind (one process, no FSDP)."""
    from ringtrain.model.build import build_model

    base = _base_folder(tmp_path / "base", 0, tied=True)
    cfg = _cfg(tmp_path / "run", f"model.path={base}", "model.arch=null", "model.config={}", "train.fsdp=false")
    out = tmp_path / "run" / "final_model"
    trained = run_distributed(_train_and_export, 1, cfg, str(out), timeout=300)[0]
    model = build_model(cfg, None, "eval")
    model.lm.load_state_dict(trained, strict=False)
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    x = torch.randint(0, 384, (2, 64))
    torch.save(x, tmp_path / "ids.pt")
    with torch.no_grad():
        reference = model.lm(x).logits
    fresh = FRESH.replace("plain = AutoModelForCausalLM.from_pretrained(merged).eval()", "plain = model")
    subprocess.run([sys.executable, "-c", fresh, base, str(out), "-", str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=300)
    assert _rel(torch.load(tmp_path / "logits.pt")["peft"], reference) < 1e-5


def _problems(tmp, *overrides):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp, *overrides)
    return e.value.problems


def test_bad_inputs_are_one_line_each(tmp_path):
    assert _problems(tmp_path, "peft.target_modules=[q_prj, v_proj]") == [
        "peft.target_modules: 'q_prj' is not a module of LlamaForCausalLM: did you mean 'q_proj'? its linear layers "
        "are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head (or use [all-linear])"]
    assert _problems(tmp_path, "peft.r=0") == ["peft.r=0 must be >= 1 (the LoRA rank, e.g. 16)"]
    assert _problems(tmp_path, "peft.trainable_modules=[embeddings, layernorms]") == [
        "peft.trainable_modules: layernorms select(s) no module of LlamaForCausalLM: use embeddings, norms, or its "
        "modules' names (embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, input_layernorm, "
        "post_attention_layernorm, norm, lm_head)"]
    # A family whose layers peft's LoRA cannot wrap: transformers' fused MoE experts (3-D weights, no nn.Linear).
    moe = ["model.arch=mixtral", "model.config={vocab_size: 384, hidden_size: 64, intermediate_size: 128, "
           "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: 2}",
           "peft.target_modules=[experts]"]
    (line,) = _problems(tmp_path, *moe)
    assert line.startswith("peft.target_modules=['experts']: peft's LoRA cannot adapt its MixtralExperts modules in "
                           "MixtralForCausalLM (ValueError: Target module MixtralExperts"), line
    assert line.endswith("choose among its linear layers q_proj, k_proj, v_proj, o_proj, lm_head"), line
    # A merged export of a model whose tensor names transformers converts: refused before training, not at its end.
    (line,) = _problems(tmp_path, *moe[:2], "checkpoint.export_merged=true")
    assert line.startswith("checkpoint.export_merged=true: MixtralForCausalLM converts its tensor names when saved"), line


def _export_adapter(dims, cfg, out):
    from ringtrain.train.trainer import build_trainer

    build_trainer(cfg, dims).export(Path(out))


def test_adapter_of_another_base_is_refused_before_any_rank_works(tmp_path):
    """model.adapter trained on another base (same shapes, other weights): one line, exit 2 from `ringtrain eval`."""
    base_a, base_b = _base_folder(tmp_path / "a", 0), _base_folder(tmp_path / "b", 1)
    out = tmp_path / "run" / "final_model"
    run_distributed(_export_adapter, 1, _cfg(tmp_path / "run", f"model.path={base_a}", "model.arch=null",
                                             "model.config={}", "train.fsdp=false"), str(out))
    cmd = [sys.executable, "-m", "ringtrain.cli", "eval", str(ROOT / "configs" / "tiny_lora.yaml"), "model.arch=null",
           "model.config={}", f"model.adapter={out}", "parallel.sp_size=1", f"train.output_dir={tmp_path / 'eval'}"]
    proc = subprocess.run([*cmd, f"model.path={base_b}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith(f"error: model.adapter='{out}' was trained on another base model ({tmp_path / 'a'}, "
                                "digest "), errors[0]
    assert errors[0].endswith(f"point model.path at the base model it was trained on ({base_a})"), errors[0]
    assert not (tmp_path / "eval").exists()  # nothing ran
    # The base it was trained on validates.
    assert load_validated_config(str(ROOT / "configs" / "tiny_lora.yaml"), [
        *cmd[5:], f"model.path={base_a}"]).model.adapter == str(out)
    # An adapter with options the `peft:` section cannot express (another scale) is refused, not applied wrongly.
    import json
    import shutil

    other = tmp_path / "rslora"
    shutil.copytree(out, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    assert _problems(tmp_path / "x", f"model.path={base_a}", "model.arch=null", "model.config={}",
                     f"model.adapter={other}") == [
        f"model.adapter='{other}' uses use_rslora, which ringtrain does not apply: evaluate it with peft directly, "
        "or export it merged (merge_and_unload) and point model.path at that folder"]


# --------------------------------------------------------------------------------------------------
# SIGTERM and resume through real torchrun; the checkpoint's size against full fine-tuning

RESUME_STEPS = 16  # long enough that the signal lands before the end on a fast machine too
RESUME = [f"train.max_steps={RESUME_STEPS}", "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=64",
          "checkpoint.every_steps=4", "checkpoint.export_merged=false", "logging.progress_bar=false"]


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    return start_torchrun(ROOT / "configs/tiny_lora.yaml", out, *RESUME, *extra, cwd=ROOT)


def _run_losses(out: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in run_metrics(out).items()}


def _finish(proc: subprocess.Popen, timeout: float = 400) -> int:
    return finish(proc, timeout)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_sigterm_and_resume_is_exact_and_the_checkpoint_is_small(tmp_path):
    """LoRA at SP=2 under torchrun: SIGTERM saves and exits 75, the resumed losses equal the uninterrupted run's
    bitwise; the checkpoint holds no frozen weight (a fraction of full fine-tuning's); another base is refused."""
    import os
    import signal

    ref = tmp_path / "ref"
    assert _finish(_torchrun(ref)) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = _run_losses(ref)
    assert sorted(reference) == list(range(1, RESUME_STEPS + 1))

    term = tmp_path / "term"
    proc = _torchrun(term)
    wait_for_steps(term, proc, 3, 300)
    os.killpg(proc.pid, signal.SIGTERM)
    _finish(proc)
    stopped = max(_run_losses(term))
    assert stopped < RESUME_STEPS, "the run finished before the signal"
    step_dir = term / "checkpoints" / f"step_{stopped:08d}"
    assert (step_dir / "COMPLETE").exists()

    # What the checkpoint holds: adapters, embeddings and norms (and their AdamW moments); no frozen weight.
    from torch.distributed.checkpoint import FileSystemReader

    keys = [k for k in FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
            if k.startswith(("train.model.", "train.optim.state."))]
    assert keys and all(_is_trained(k) for k in keys), [k for k in keys if not _is_trained(k)]
    lora_bytes = _folder_bytes(step_dir)

    # Resuming on another base (the random init of another seed) is refused: one line, exit 2, nothing changed.
    log_before = (tmp_path / "term.log").read_text()
    assert _finish(_torchrun(term, "train.seed=1")) != 0
    errors = [line for line in (tmp_path / "term.log").read_text()[len(log_before):].splitlines()
              if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {step_dir} was trained on another base "
                                                     "model (model.arch=llama, digest "), errors
    assert max(_run_losses(term)) == stopped

    assert _finish(_torchrun(term)) == 0, (tmp_path / "term.log").read_text()[-3000:]
    assert _run_losses(term) == reference  # every step once, each loss bitwise equal

    # Full fine-tuning of the same model, one step: its checkpoint against LoRA's.
    full = tmp_path / "full"
    assert _finish(_torchrun(full, "peft.method=none", "train.max_steps=1", "checkpoint.export_final=false")) == 0
    full_bytes = _folder_bytes(full / "checkpoints" / "step_00000001")
    print(f"checkpoint bytes: LoRA {lora_bytes}, full fine-tuning {full_bytes} ({lora_bytes / full_bytes:.3f})")
    assert lora_bytes < 0.25 * full_bytes, (lora_bytes, full_bytes)


def test_frozen_output_head_gets_no_weight_gradient():
    """With a frozen lm_head (LoRA's default) the fused loss builds no [vocab, hidden] gradient; the hidden states'
    gradient still equals the dense float64 reference."""
    from ringtrain.model.loss import chunked_cross_entropy_sum

    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64)  # frozen
    y = torch.randint(0, 40, (50,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, h)
    out = chunked_cross_entropy_sum(h, w, y, chunk_tokens=7)
    out.backward()
    assert w.grad is None
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-6)
    assert (h.grad - ref_grad).abs().max() <= 1e-12 * ref_grad.abs().max()


def test_planner_counts_only_what_trains(tmp_path):
    """`ringtrain plan` with LoRA: the adapters join the parameters, AdamW's states and the gradients count only what
    trains (as the built model has it), and the frozen head's loss gradient is gone."""
    from ringtrain.model.build import build_model
    from ringtrain.planner import model_shape, predict, setup_from_config

    cfg, full = _cfg(tmp_path, "parallel.sp_size=2"), _cfg(tmp_path, "parallel.sp_size=2", "peft.method=none")
    shape, full_shape = model_shape(cfg.model, cfg.peft), model_shape(full.model, full.peft)
    built = build_model(cfg, None, "train")
    assert shape.params == sum(p.numel() for p in built.parameters())
    assert shape.trained == sum(p.numel() for p in built.parameters() if p.requires_grad) < full_shape.params / 3
    setup = setup_from_config(cfg, 2, "cpu")
    lora, ft = predict(shape, setup), predict(full_shape, setup)
    step = lora["moments"]["optimizer step"]
    assert step == (shape.params + 4 * shape.trained) * 4 / 2  # params, grads, 2 states, step temp: fp32 over 2
    assert lora["peak_bytes"] < ft["peak_bytes"]


def test_training_refuses_model_adapter_instead_of_ignoring_it(tmp_path, monkeypatch, capsys):
    """model.adapter is read by `ringtrain eval`; a training run would start from the base alone: refused, exit 2."""
    import dataclasses

    from ringtrain import cli
    from ringtrain.validate import load_validated_config

    cfg = load_validated_config(ROOT / "configs" / "tiny_lora.yaml", [f"train.output_dir={tmp_path}"])
    with_adapter = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=str(tmp_path / "adapter")))
    monkeypatch.setattr(cli, "_load", lambda args, world: with_adapter)  # the folder checks are validate's own tests
    assert cli.main(["train", str(ROOT / "configs" / "tiny_lora.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is read by `ringtrain eval` only" in err[0], err
    assert not (tmp_path / "checkpoints").exists()
