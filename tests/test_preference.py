"""Preference training (DPO, SimPO, ORPO) on pairs packed as documents: at SP=2 (ring, Ulysses), DP=2 and with
gradient accumulation the loss and every gradient equal a single-process reference that runs each response as its
own unpacked sequence and computes the standard losses from full logits; DPO starts at ln 2; the data and config
checks; SIGTERM and resume exact under torchrun."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringtrain.errors import ConfigError
from ringtrain.testing import finish, run_distributed, run_metrics, start_torchrun, wait_for_steps
from ringtrain.validate import load_validated_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "ringtrain" / "data" / "samples"
TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512}",
    "data.source=files", f"data.path={SAMPLES / 'preference.jsonl'}", "data.tokenizer=bytes",
    "train.objective=dpo", "train.beta=0.5", "parallel.sp_size=2", "train.seq_len=256", "train.micro_batch_size=2", "train.threads=1",
    "train.fsdp=false", "logging.progress_bar=false", "checkpoint.export_final=false",
]
RTOL = 1e-5


def _short_pairs(tmp) -> Path:
    """The sample's short records (no retrieval prompt): several pairs fill one 512-token sequence."""
    path = Path(tmp) / "short.jsonl"
    lines = [line for line in (SAMPLES / "preference.jsonl").read_text().splitlines() if len(line) < 160]
    path.write_text("\n".join(lines[:48]) + "\n")
    return path


def _cfg(tmp, *overrides):
    return load_validated_config(None, [*TINY, f"train.output_dir={tmp}", f"data.cache_dir={tmp}/cache", *overrides])


def _response_logps(lm, batch, b, d):
    """(sum of log p over the response labels, their count) of document d of row b, run alone from full logits."""
    ids, labels, docs = batch["input_ids"][b], batch["labels"][b], batch["document_ids"][b]
    inside = docs == d
    tokens, targets = ids[inside][None], labels[inside]
    logits = lm(input_ids=tokens, use_cache=False).logits[0, :-1].to(torch.float64)  # [n - 1, V]
    valid = targets[1:] != -100
    logp = torch.log_softmax(logits, -1).gather(1, targets[1:].clamp(min=0)[:, None]).squeeze(1)
    return (logp * valid).sum(), valid.sum().to(torch.float64)


def _reference_loss(policy, reference, batches, objective, beta, gamma):
    """The standard per-pair losses from two unpacked forwards per pair, averaged over every pair of `batches`."""
    losses, most = [], 0
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            pair_docs = sorted(set(batch["document_ids"][b][batch["response_ids"][b] >= 0].tolist()))
            assert len(pair_docs) % 2 == 0 and len(pair_docs) >= 2
            most = max(most, len(pair_docs) // 2)
            for c, r in zip(pair_docs[0::2], pair_docs[1::2], strict=True):
                (pc, nc), (pr, nr) = _response_logps(policy, batch, b, c), _response_logps(policy, batch, b, r)
                if objective == "dpo":
                    with torch.no_grad():
                        rc, rr = _response_logps(reference, batch, b, c)[0], _response_logps(reference, batch, b, r)[0]
                    losses.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
                elif objective == "simpo":
                    losses.append(-F.logsigmoid(beta * pc / nc - beta * pr / nr - gamma))
                else:  # orpo
                    mc, mr = pc / nc, pr / nr
                    odds = torch.log(torch.exp(mc) / (1 - torch.exp(mc))) - torch.log(torch.exp(mr) / (1 - torch.exp(mr)))
                    losses.append(-mc - beta * F.logsigmoid(odds))
    return torch.stack(losses).mean(), most


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _perturb(model, seed):
    """Move the trained parameters away from the start (the same on every rank), so the policy differs from the
    reference and LoRA's B is not zero."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.requires_grad:
                moved = _full(p) + 0.05 * noise.to(p.dtype)
                p.copy_(distribute_tensor(moved, p.device_mesh, p.placements) if hasattr(p, "full_tensor") else moved)


def _case(dims, cfg, accum):
    """(distributed loss, grads by name, reference loss, reference grads, number of pairs) of one step of `accum`
    micro-batches on `dims`, in float64 (in float32 under FSDP2, which keeps the dtype it sharded)."""
    from ringtrain.model.build import build_model
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, dims)
    if not cfg.train.fsdp:
        trainer.model.double()
        if trainer.reference is not None and trainer.reference.model is not trainer.model:
            trainer.reference.model.double()
    step0 = trainer.forward_backward([next(trainer.loader) for _ in range(accum)])
    trainer.optimizer.zero_grad(set_to_none=True)
    _perturb(trainer.model, 1)
    micro = [next(trainer.loader) for _ in range(accum)]
    loss = trainer.forward_backward(micro)
    grads = {n: _full(p.grad).double() for n, p in trainer.model.named_parameters() if p.grad is not None}
    # Every DP rank's micro-batches (SP ranks hold the same ones).
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, (dims.dp_rank, micro))
    batches = [b for _, m in sorted(dict(gathered).items()) for b in m]
    policy = build_model(cfg, None, "train").double()  # one process, the model's own attention
    policy.load_state_dict({k: _full(v).double() for k, v in trainer.model.state_dict().items()})
    tcfg = cfg.train
    if tcfg.reference:  # another model, read by transformers itself
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(tcfg.reference, dtype=torch.float64)
    else:  # the starting weights (adapters: B = 0, the base model)
        reference = build_model(cfg, None, "eval").double().lm
    ref_loss, most = _reference_loss(policy.lm, reference, batches, tcfg.objective, tcfg.beta, tcfg.simpo_gamma)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    return step0, loss, grads, ref_loss.item(), ref_grads, most, trainer.preference_metrics


def _all_cases(dims, cases):
    from ringtrain.config import ParallelConfig
    from ringtrain.parallel import ParallelDims

    meshes = {"ring": dims, "ulysses": ParallelDims.build(ParallelConfig(sp_size=2, ulysses_size=2),
                                                          device=dims.device, document_mask=True),
              "dp": ParallelDims.build(ParallelConfig(sp_size=1), device=dims.device, document_mask=True)}
    return {name: _case(meshes[mesh], cfg, accum) for name, (mesh, cfg, accum) in cases.items()}


def test_packed_pairs_at_sp2_equal_unpacked_single_process(tmp_path):
    """DPO (frozen copy, another model by path and LoRA adapters-off references), SimPO and ORPO: the loss and every gradient at SP=2 ring
    and Ulysses, at DP=2, with 2 accumulated micro-batches of several packed pairs each, equal one process running
    each response alone (float64, relative 1e-5); with reference = policy DPO's first loss is ln 2."""
    short = [f"data.path={_short_pairs(tmp_path)}", "train.seq_len=512"]
    other = _other_model(tmp_path / "other", vocab_size=384)
    cases = {
        "dpo_ring": ("ring", _cfg(tmp_path / "a", *short), 2),
        "dpo_ulysses": ("ulysses", _cfg(tmp_path / "b", *short, "parallel.ulysses_size=2"), 1),
        "dpo_dp": ("dp", _cfg(tmp_path / "c", *short, "parallel.sp_size=1"), 1),
        "dpo_reference_path": ("ring", _cfg(tmp_path / "i", *short, f"train.reference={other}"), 1),
        "dpo_lora_ring": ("ring", _cfg(tmp_path / "d", *short, "peft.method=lora", "peft.r=4",
                                          "peft.trainable_modules=[]", "peft.dropout=0.0"), 1),
        "simpo_ring": ("ring", _cfg(tmp_path / "e", *short, "train.objective=simpo", "train.beta=2.0"), 1),
        "orpo_ulysses": ("ulysses", _cfg(tmp_path / "f", *short, "train.objective=orpo", "parallel.ulysses_size=2"),
                         1),
        # FSDP2 (float32): the frozen copy sharded like the policy; LoRA's adapters disabled on sharded layers.
        "dpo_fsdp": ("ring", _cfg(tmp_path / "g", *short, "train.fsdp=true"), 1),
        "dpo_lora_fsdp": ("ulysses", _cfg(tmp_path / "h", *short, "train.fsdp=true", "parallel.ulysses_size=2",
                                          "peft.method=lora", "peft.r=4", "peft.trainable_modules=[]"), 1),
    }
    results = run_distributed(_all_cases, 2, cases, timeout=400)
    for name, (step0, loss, grads, ref_loss, ref_grads, most, metrics) in results[0].items():
        rtol = 1e-4 if name.endswith("fsdp") else RTOL  # float32 against the float64 reference
        assert most >= 2, (name, most)  # several pairs in one sequence
        if name.startswith("dpo") and name != "dpo_reference_path":
            assert abs(step0 - math.log(2)) < rtol * 1e-3, (name, step0)
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss), (name, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and grads, name
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for n, g in ref_grads.items():
            err = (grads[n] - g).abs().max().item()
            assert err <= rtol * scale, f"{name} {n}: max err {err:.3e} vs max |grad| {scale:.3e}"
        assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
        assert metrics["rewards/margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    # Each rank of a mesh returns the same loss.
    assert all(results[1][k][1] == results[0][k][1] for k in cases)


def test_chunked_token_logprobs_match_full_logits():
    """The chunked log-probabilities and their backward (recomputed chunk by chunk, soft-capped or not) against
    full logits, in float64."""
    from ringtrain.model.loss import chunked_token_logprobs

    torch.manual_seed(0)
    for cap in (None, 3.0):
        h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
        w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 11, (37,))
        y[[3, 9]] = -100
        g = torch.randn(37, dtype=torch.float64)
        got = chunked_token_logprobs(h, w, y, chunk_tokens=5, softcap=cap)
        grads = torch.autograd.grad((got * g).sum(), (h, w))
        logits = h @ w.T if cap is None else cap * torch.tanh(h @ w.T / cap)
        ref = torch.log_softmax(logits, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1) * (y != -100)
        ref_grads = torch.autograd.grad((ref * g).sum(), (h, w))
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, ref_grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Data: pairs packed whole, responses labelled; bad inputs one line each


def test_pairs_are_packed_together_and_labelled(tmp_path):
    """Plain and chat records: each pair's two documents share a sequence, and the response ids mark exactly the
    responses' tokens (prompt tokens carry none), chosen before rejected."""
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset

    tok = build_tokenizer("bytes")
    for path in ("preference.jsonl", "preference_chat.jsonl"):
        cfg = _cfg(tmp_path, f"data.path={SAMPLES / path}", "train.seq_len=1024")
        assert cfg.data.format == "preference"  # from the objective: the file needs no other key
        ds = build_packed_dataset(cfg.data, 1024, tok)
        records = [json.loads(line) for line in (SAMPLES / path).read_text().splitlines()]
        responses = {(r["chosen"], r["rejected"]) for r in records}
        batch = ds.batch(range(len(ds)))
        ids, rid = batch["response_ids"], batch["input_ids"]
        n = 0
        for b in range(len(ds)):
            texts = {}
            for k in sorted(set(ids[b][ids[b] >= 0].tolist())):
                texts[k] = tok.decode(rid[b][ids[b] == k].tolist())
            pairs = sorted({k // 2 for k in texts})
            assert len(texts) == 2 * len(pairs)
            for p in pairs:
                chosen, rejected = texts[2 * p], texts[2 * p + 1]
                assert chosen.endswith("</s>") and rejected.endswith("</s>")
                key = tuple(t.removesuffix("</s>").removesuffix("<|end|>\n") for t in (chosen, rejected))
                assert key in responses, key
                n += 1
        assert n == len(records)


def test_chat_prompt_turns_carry_no_loss(tmp_path):
    """A multi-turn chat prompt (an earlier assistant turn included): only the final response carries labels."""
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset

    prompt = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "EARLIER TURN"},
              {"role": "user", "content": "Now say bye."}]
    path = tmp_path / "turns.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": "Bye!", "rejected": "Hi!"}) + "\n")
    tok = build_tokenizer("bytes")
    batch = build_packed_dataset(_cfg(tmp_path, f"data.path={path}").data, 256, tok).batch([0])
    ids, rid = batch["input_ids"][0], batch["response_ids"][0]
    assert "EARLIER TURN" in tok.decode(ids.tolist())
    assert [tok.decode(ids[rid == k].tolist()) for k in (0, 1)] == ["Bye!<|end|>\n</s>", "Hi!<|end|>\n</s>"]


def test_an_empty_prompt_is_a_bad_record(tmp_path):
    """An empty plain prompt would make each response open its document, whose first token is never a label: both
    responses would silently lose a token. It is refused with the other bad records, counted and named."""
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset

    path = tmp_path / "empty_prompt.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ({"prompt": "Q: 1+1? A: ", "chosen": "2", "rejected": "3"},
                                                      {"prompt": "", "chosen": "yes", "rejected": "no"})) + "\n")
    with pytest.raises(ConfigError) as err:
        build_packed_dataset(_cfg(tmp_path, f"data.path={path}").data, 256, build_tokenizer("bytes"))
    assert err.value.problems == [f"data.path='{path}': 1 of 2 records have an empty 'prompt' field (a response "
                                  "needs a prompt before it) (record 1 first, counting from 0): fix or remove them"]


def test_orpo_stays_finite_for_a_response_predicted_with_certainty():
    """A response whose every token has probability 1 in fp32 has mean log-probability exactly 0: log(1 - e^0) is
    -inf, and the log odds would be inf - inf. ORPO's loss and gradient stay finite."""
    from ringtrain.train.preference import preference_losses

    for certain in (0, 1):
        policy = torch.tensor([[-3.0, -5.0]], requires_grad=True)
        with torch.no_grad():
            policy[0, certain] = 0.0
        loss, _ = preference_losses("orpo", policy, torch.tensor([[3.0, 5.0]]), None, beta=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(policy.grad).all(), (certain, loss, policy.grad)


def _problems(tmp, *overrides):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp, *overrides)
    return e.value.problems


def test_bad_inputs_are_one_line_each(tmp_path):
    assert _problems(tmp_path, "train.beta=0") == ["train.beta=0.0 must be > 0 (DPO's KL strength, e.g. 0.1)"]
    assert _problems(tmp_path, "train.objective=ppo") == ["train.objective='ppo' is not one of sft, dpo, simpo, orpo"]
    assert _problems(tmp_path, "data.long_tokens=100", "data.long_upsample=2") == [
        "train.objective='dpo' trains on prompt / chosen / rejected records: data.long_upsample repeats documents one by "
        "one and would split pairs: set data.long_upsample=1 (or data.long_tokens=0)"]
    assert _problems(tmp_path, "train.objective=sft", "data.format=preference") == [
        "data.format='preference' trains a preference objective, and train.objective='sft': set train.objective to one "
        "of dpo, simpo, orpo"]
    # A file whose records lack `rejected`: refused by the file check before anything loads.
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text("".join(json.dumps({"prompt": "a", "chosen": "b"}) + "\n" for _ in range(3)))
    from ringtrain.data.checks import data_file_problems

    cfg = _cfg(tmp_path, f"data.path={lacking}")
    assert data_file_problems(cfg.data) == [
        f"data.rejected_field='rejected' is not in any of the first 100 records of {lacking}: choose one of prompt, "
        "chosen, or leave the file out of data.path"]
    # One bad record among good ones: counted, reported with its index, refused.
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset

    mixed = tmp_path / "mixed.jsonl"
    good = [json.loads(line) for line in (SAMPLES / "preference.jsonl").read_text().splitlines()[:9]]
    good.insert(4, {"prompt": "Question: 1 + 1?\nAnswer: ", "chosen": "2.", "rejected": None})
    mixed.write_text("".join(json.dumps(r) + "\n" for r in good))
    with pytest.raises(ConfigError) as e:
        build_packed_dataset(_cfg(tmp_path, f"data.path={mixed}").data, 256, build_tokenizer("bytes"))
    assert e.value.problems == [f"data.path='{mixed}': 1 of 10 records have no 'rejected' field (record 4 first, "
                                "counting from 0): fix or remove them"]


def _other_model(folder: Path, vocab_size: int) -> Path:
    """A model folder of the test model's shape (with this vocabulary) and weights of its own."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=512)).save_pretrained(folder)
    return folder


def test_command_line_bad_inputs_exit_2_with_one_line(tmp_path):
    """`ringtrain validate` (beta, a file lacking `rejected`) and `ringtrain data` (one bad record among good ones):
    exit 2, one `error:` line, no traceback."""
    import subprocess
    import sys

    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    lines = (SAMPLES / "preference.jsonl").read_text().splitlines()[:6]
    mixed.write_text("\n".join([*lines[:2], json.dumps({"prompt": "Q: ", "chosen": "y", "rejected": None}), *lines[2:]])
                     + "\n")
    config = str(ROOT / "configs/tiny_dpo.yaml")
    for command, override, expected in (
            ("validate", "train.beta=-1", "error: train.beta=-1.0 must be > 0 (DPO's KL strength, e.g. 0.1)"),
            ("validate", f"data.path={lacking}", f"error: data.rejected_field='rejected' is not in any of the first "
                                                  f"100 records of {lacking}: choose one of prompt, chosen, or leave "
                                                  "the file out of data.path"),
            ("data", f"data.path={mixed}", f"error: data.path='{mixed}': 1 of 7 records have no 'rejected' field "
                                           "(record 2 first, counting from 0): fix or remove them")):
        proc = subprocess.run([sys.executable, "-m", "ringtrain.cli", command, config, override,
                               f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and errors == [expected] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_reference_of_other_shapes_is_refused(tmp_path):
    """train.reference: a model folder of another vocabulary is one line (before any rank works)."""
    folder = _other_model(tmp_path / "other", vocab_size=400)
    (line,) = _problems(tmp_path, f"train.reference={folder}")
    assert line.startswith(f"train.reference='{folder}': model.embed_tokens.weight is [400, 32] there but [384, 32] "
                           "in the trained model"), line
    assert _problems(tmp_path, "train.objective=simpo", f"train.reference={folder}") == [
        f"train.reference='{folder}' is used by objective='dpo' only (objective='simpo'): remove it"]


def test_plan_counts_the_reference():
    """`ringtrain plan`: DPO with full fine-tuning holds a frozen copy (its parameters once more) and one more
    forward; with LoRA the reference is the base with the adapters disabled (no copy); SimPO has no reference."""
    from ringtrain.planner import model_shape, predict, setup_from_config

    results = {}
    for name, extra in {"copy": ["peft.method=none"], "adapters": [], "simpo": ["train.objective=simpo"],
                        "sft": ["train.objective=sft", "data.format=auto", "data.source=passkey"]}.items():
        cfg = load_validated_config(str(ROOT / "configs/tiny_dpo.yaml"), extra)
        setup = setup_from_config(cfg, 2, "cpu")
        results[name] = (setup.reference, predict(model_shape(cfg.model, cfg.peft), setup))
    (kind, copy), (kind_a, adapters) = results["copy"], results["adapters"]
    assert (kind, kind_a, results["simpo"][0], results["sft"][0]) == ("copy", "adapters", "none", "none")
    assert copy["components"]["reference_copy"] == copy["components"]["parameters"] > 0
    assert adapters["components"]["reference_copy"] == 0
    sft, simpo = results["sft"][1], results["simpo"][1]
    assert sft["flops_per_step"] == simpo["flops_per_step"]
    assert sft["hardware_flops_per_step"] < simpo["hardware_flops_per_step"]  # the recomputed logits
    assert adapters["hardware_flops_per_step"] > simpo["hardware_flops_per_step"]


# --------------------------------------------------------------------------------------------------
# SIGTERM and resume through real torchrun

RESUME_STEPS = 12
RESUME = [f"train.max_steps={RESUME_STEPS}", "checkpoint.every_steps=3", "logging.progress_bar=false"]


def _torchrun(out: Path, cache: Path, *extra: str):
    return start_torchrun(ROOT / "configs/tiny_dpo.yaml", out, f"data.cache_dir={cache}", *RESUME, *extra, cwd=ROOT)


def test_sigterm_and_resume_is_exact(tmp_path):
    """configs/tiny_dpo.yaml (LoRA, adapters-off reference) at SP=2 under torchrun: SIGTERM saves and exits, the
    resumed run's losses and rewards equal the uninterrupted run's bitwise, and metrics.jsonl holds the rewards."""
    cache = tmp_path / "cache"
    ref = tmp_path / "ref"
    assert finish(_torchrun(ref, cache), 400) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = run_metrics(ref)
    assert sorted(reference) == list(range(1, RESUME_STEPS + 1))
    assert abs(reference[1]["loss"] - math.log(2)) < 1e-6  # the policy starts as its reference
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(reference[1])

    term = tmp_path / "term"
    proc = _torchrun(term, cache)
    wait_for_steps(term, proc, 4, 300)
    os.killpg(proc.pid, signal.SIGTERM)
    assert finish(proc, 400) != 0  # 75 from the ranks: torchrun reports 1
    assert json.loads((term / "stopped.json").read_text())["exit_code"] == 75
    stopped = max(run_metrics(term))
    assert stopped < RESUME_STEPS, "the run finished before the signal"
    assert (term / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").exists()
    assert finish(_torchrun(term, cache), 400) == 0, (tmp_path / "term.log").read_text()[-3000:]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "grad_norm")
    got = {s: {k: r[k] for k in keys} for s, r in run_metrics(term).items()}
    assert got == {s: {k: r[k] for k in keys} for s, r in reference.items()}
