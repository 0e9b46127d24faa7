"""What transformers would reject later, found before any rank does work: `ringtrain validate`, `rope`, `train` and
`eval` all load their config through `ringtrain.validate.load_validated_config`, which calls `model_problems`.

The checks build what the run will build, on the meta device: the transformers config with the `model.config`
overrides, RoPE scaling, the causal LM itself. Each problem is one line naming the key, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ringtrain.config import ModelConfig
from ringtrain.model.causal_lm import (
    CausalLMWithChunkedLoss,
    build_meta_model,
    build_model_config,
    config_class_keys,
    model_config_and_ignored,
)

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig



def model_problems(cfg: TrainConfig, *, weights: bool = True) -> list[str]:
    """Problems with the model `cfg` describes, each one line naming the key, the value and the fix: model.path,
    model.config keys (with did-you-mean), types and shapes, RoPE scaling, whether transformers builds it (on the
    meta device), whether model.path's weights fit it, and its heads against parallel.ulysses_size. `weights=False`:
    a folder without weights is fine (its weights are still checked when it has them)."""
    model = cfg.model
    if model is None or model._validate():
        return []  # the structural checks report it
    where = f"model.path={model.path!r}" if model.path is not None else f"model.arch={model.arch!r}"
    if model.path is not None:
        problems = _path_problems(model.path, weights)
        if problems:
            return problems
    try:
        base = build_model_config(dataclasses.replace(model, config={}))
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the user gets one line
        if model.path is not None and Path(model.path).expanduser().is_dir():
            return [f"{where}: transformers cannot read its config.json ({_reason(e)}): fix or replace that file"]
        return [f"{where} is neither a local folder nor loadable from the Hugging Face hub ({_reason(e)}): fix the "
                "path or name (hub models may need `huggingface-cli login`), or download it and point model.path at "
                "the folder"]
    problems = _override_problems(model, base)
    if problems:
        return problems
    try:
        config, ignored = model_config_and_ignored(model)
    except Exception as e:  # noqa: BLE001
        return [f"model.config: {type(base).__name__} rejects these values: {_reason(e)}"]
    if ignored:
        return [_unknown_key(model, type(config), key) for key in ignored]
    return _built_model_problems(cfg, config, where)


def _path_problems(path: str, weights: bool = True) -> list[str]:
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return [f"model.path={path!r} is a folder without config.json: point it at a transformers model folder "
                    "(what save_pretrained writes, e.g. a run's final_model/)"]
        if weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            return [f"model.path={path!r} holds no weights (*.safetensors or pytorch_model*.bin): point it at a model "
                    "folder with its weights, or use model.arch for a random init"]
        return []
    if folder.exists():
        return [f"model.path={path!r} is a file: point it at the model's folder"]
    # A hub id is 'name' or 'namespace/name'; anything else can only be a local path, and that does not exist.
    if path.count("/") > 1 or path.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in path:
        return [f"model.path={path!r} does not exist (relative to {os.getcwd()}): fix the path, or first run what "
                "writes it (a finished run exports its model to <train.output_dir>/final_model)"]
    return []  # a hub name: whether it loads is checked with its config


def _reason(e: BaseException) -> str:
    """One line of what transformers said (strict-dataclass errors wrap the useful message as their cause)."""
    lines = [line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip()]
    return f"{type(e.__cause__ or e).__name__}: {lines[0] if lines else ''}"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _override_problems(model: ModelConfig, base: Any) -> list[str]:
    """Wrong types (transformers' own field validators, each key on its own) and inconsistent sizes in model.config."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    cls = type(base)
    fields, aliases = config_class_keys(cls)
    problems = []
    probe = copy.deepcopy(base)
    for key, value in model.config.items():
        if key in fields or key in aliases:
            try:
                setattr(probe, key, value)
            except StrictDataclassFieldValidationError as e:
                problems.append(f"model.config.{key}={value!r} is rejected by {cls.__name__}: {_reason(e)}")
    if problems:
        return problems
    # The sizes as transformers will see them: the folder's config (or the class defaults) under the overrides.
    if model.path is not None:
        raw = base.to_dict()
    else:
        raw = {name: f.default for name, f in fields.items() if f.default is not dataclasses.MISSING}
    raw.update({aliases.get(k, k): v for k, v in model.config.items()})
    sizes = {k: raw.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim")}
    for key, value in sizes.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"model.config.{key}={value} must be >= 1")
    hidden, heads, head_dim = sizes["hidden_size"], sizes["num_attention_heads"], sizes["head_dim"]
    if problems or not (isinstance(hidden, int) and isinstance(heads, int)):
        return problems
    kv = sizes["num_key_value_heads"] or heads
    if head_dim is None and hidden % heads:
        problems.append(f"model.config.num_attention_heads={heads} does not divide model.config.hidden_size={hidden}: "
                        f"choose num_attention_heads among {_divisors(hidden)}, or set model.config.head_dim")
    if isinstance(kv, int) and heads % kv:
        problems.append(f"model.config.num_key_value_heads={kv} does not divide model.config.num_attention_heads="
                        f"{heads} (each key/value head serves a group of query heads): choose num_key_value_heads "
                        f"among {_divisors(heads)}")
    dim = head_dim or hidden // heads
    if "rope_parameters" in fields and isinstance(dim, int) and dim % 2:
        source = "" if head_dim else f" (hidden_size / num_attention_heads = {hidden} / {heads})"
        problems.append(f"model.config.head_dim={dim}{source} is odd: RoPE rotates pairs of dimensions, so choose an "
                        "even head size")
    return problems


def _unknown_key(model: ModelConfig, cls: type, key: str) -> str:
    from transformers import PreTrainedConfig

    fields, aliases = config_class_keys(cls)
    close = difflib.get_close_matches(key, [*fields, *aliases], n=1, cutoff=0.6)
    if close:
        hint = f"did you mean 'model.config.{close[0]}'?"
    else:
        own = [f for f in fields if f not in config_class_keys(PreTrainedConfig)[0]]
        hint = f"{cls.__name__}'s own settings are {', '.join(own)}"
    ignored = " (transformers would silently ignore it)" if model.path is not None else ""
    return f"unknown key 'model.config.{key}' for {cls.__name__}{ignored}: {hint}"


def _built_model_problems(cfg: TrainConfig, config: Any, where: str) -> list[str]:
    """RoPE scaling, the meta-device build, the weights' shapes and the heads against Ulysses, on the final config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from ringtrain.hf.attention import sequence_parallel_problems
    from ringtrain.hf.rope import apply_rope_scaling
    from ringtrain.model.moe import balancing_loss
    from ringtrain.model.weights import checkpoint_shapes, unique_state
    from ringtrain.ring.ulysses import ulysses_head_problems

    model = cfg.model
    if not model.trust_remote_code and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return [f"{where}: model type {config.model_type!r} has no causal language model in transformers "
                "(AutoModelForCausalLM): use a decoder model such as llama, mistral, qwen2 or qwen3"]
    if cfg.rope is not None and not cfg.rope._validate():
        try:
            apply_rope_scaling(config, cfg.rope)
        except ValueError as e:
            message = str(e)
            return [message if message.startswith("rope.") else f"rope.method={cfg.rope.method!r}: {message}"]
    try:
        lm = build_meta_model(model, config, torch.float32)
        CausalLMWithChunkedLoss(lm, 0)  # what the trainer and the evaluation's loss support
    except Exception as e:  # noqa: BLE001
        return [f"{where}: transformers cannot build {type(config).__name__} with this model.config ({_reason(e)})"]
    sp_size = cfg.parallel.sp_size if cfg.parallel is not None and not cfg.parallel._validate() else None
    refused = [f"{where}: {problem}" for problem in sequence_parallel_problems(lm, sp_size)]  # before any rank works
    if cfg.train is not None and cfg.train.tiled_mlp and balancing_loss(config) is not None:
        refused.append(f"train.tiled_mlp=true with {type(config).__name__}: each MoE block would be recomputed per tile "
                       "and its router logits would carry no gradient, so the balancing loss would not train the "
                       "router: set train.tiled_mlp=false, or model.config.router_aux_loss_coef=0.0")
    if refused:
        return refused
    problems = adapter_problems(cfg, lm) + reference_problems(cfg, lm)
    if model.path is not None and Path(model.path).expanduser().is_dir():
        shapes = checkpoint_shapes(Path(model.path).expanduser())
        wrong = [(name, list(t.shape), shapes[name]) for name, t in unique_state(lm).items()
                 if name in shapes and list(t.shape) != shapes[name]]
        if wrong:
            name, built, saved = wrong[0]
            fix = (f"remove the model.config overrides that change shapes ({', '.join(map(str, model.config))})"
                   if model.config else "its config.json does not describe these weights")
            problems.append(f"{where}: {name} is {saved} in the folder but {built} in the model built from its config "
                            f"({len(wrong)} tensor(s) differ): {fix}")
    u = cfg.parallel.ulysses_size if cfg.parallel is not None else 1
    if u > 1 and not cfg.parallel._validate():  # an invalid ulysses_size is reported by the parallel section
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        problems += [f"parallel.ulysses_size={u}: {problem} (model: {heads} query heads, {kv} key/value heads)"
                     for problem in ulysses_head_problems(heads, kv, u)]
    return problems


def reference_problems(cfg: TrainConfig, lm: torch.nn.Module) -> list[str]:
    """train.reference (DPO's reference model by path) against the trained model `lm` (meta device): a model folder
    whose tensors have the trained model's names and shapes (the vocabulary included)."""
    from ringtrain.model.weights import checkpoint_shapes, unique_state

    path = cfg.train.reference if cfg.train is not None else ""
    if not path or cfg.train.objective != "dpo":  # the train section refuses a reference the objective does not use
        return []
    where = f"train.reference={path!r}"
    problems = [p.replace(f"model.path={path!r}", where) for p in _path_problems(path)]
    if problems:
        return problems
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [f"{where} is not a local model folder: download the reference model and point train.reference at it"]
    shapes = checkpoint_shapes(folder)
    built = {name: list(t.shape) for name, t in unique_state(lm).items()}
    wrong = [(name, shapes.get(name), shape) for name, shape in built.items() if shapes.get(name) != shape]
    if not wrong:
        return []
    name, there, here = wrong[0]
    return [f"{where}: {name} is {there if there is not None else 'missing'} there but {here} in the trained model "
            f"({len(wrong)} tensor(s) differ): point train.reference at a model of the trained model's shapes and "
            "vocabulary, or leave it empty for the starting weights"]


def adapter_problems(cfg: TrainConfig, lm: torch.nn.Module) -> list[str]:
    """The `peft:` section against the model (`lm` on the meta device): target modules it has and peft can adapt,
    trainable modules it has; and model.adapter, a folder of adapters trained on this base model."""
    problems = []
    if cfg.peft is not None and cfg.peft.enabled and not cfg.peft._validate():
        problems += _lora_problems(cfg.peft, lm)
        from ringtrain.model.weights import uses_key_conversion

        if cfg.checkpoint.export_merged and uses_key_conversion(lm):
            # Known before training, not after it: the export would refuse at the end of the run.
            problems.append(f"checkpoint.export_merged=true: {type(lm).__name__} converts its tensor names when saved, "
                            "so a merged LoRA export is not supported for it: set checkpoint.export_merged=false "
                            "(the adapter folder is exported either way)")
    if cfg.model.adapter is not None:
        problems += _adapter_folder_problems(cfg, lm)
    return problems


def _linear_names(lm: torch.nn.Module) -> str:
    """The distinct last names of the model's linear layers (what target_modules may name), in model order."""
    names = [n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    return ", ".join(dict.fromkeys(names))


def _lora_problems(peft: Any, lm: torch.nn.Module) -> list[str]:
    import re

    from ringtrain.model.adapters import apply_adapters

    cls = type(lm).__name__
    names = [n for n, _ in lm.named_modules() if n]
    problems = []
    if peft.target_modules != ["all-linear"]:
        for target in peft.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                close = difflib.get_close_matches(target, [n.rsplit(".", 1)[-1] for n in names], n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"peft.target_modules: {target!r} is not a module of {cls}: {hint}its linear layers "
                                f"are {_linear_names(lm)} (or use [all-linear])")
    if problems:
        return problems
    try:
        apply_adapters(copy.deepcopy(lm), peft)
    except Exception as e:  # noqa: BLE001 - whatever peft raises, the user gets one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if message.startswith("peft.trainable_modules"):
            own = [n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if n and next(m.parameters(False), None) is not None]
            return [f"{message}: use embeddings, norms, or its modules' names ({', '.join(dict.fromkeys(own))})"]
        module = re.match(r"Target module (\w+)", message)
        what = f"its {module.group(1)} modules" if module else "these modules"
        return [f"peft.target_modules={peft.target_modules}: peft's LoRA cannot adapt {what} in {cls} "
                f"({type(e).__name__}: {message[:160]}): choose among its linear layers {_linear_names(lm)}"]
    return []


def _adapter_folder_problems(cfg: TrainConfig, lm: torch.nn.Module) -> list[str]:
    from ringtrain.model.adapters import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        apply_adapters,
        base_identity,
        identity_problem,
        peft_key,
        read_adapter_folder,
        with_adapter,
    )

    where = f"model.adapter={cfg.model.adapter!r}"
    folder = Path(cfg.model.adapter).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        return [f"{where} is not a peft adapter folder (no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): point it at "
                "the final_model/ of a run with peft.method=lora"]
    try:
        peft_config, identity = read_adapter_folder(folder)
        adapted = with_adapter(cfg)
    except Exception as e:  # noqa: BLE001
        return [f"{where}: its {ADAPTER_CONFIG} cannot be read ({_reason(e)})"]
    if peft_config.get("peft_type") != "LORA":
        return [f"{where} holds a {peft_config.get('peft_type')} adapter: only LoRA adapters are supported"]
    # What the `peft:` section cannot express would be applied wrongly (another scale, other ranks): refused.
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "target_parameters", "trainable_token_indices") if peft_config.get(k)]
    if peft_config.get("bias", "none") != "none":
        unsupported.append(f"bias={peft_config['bias']}")
    if unsupported:
        return [f"{where} uses {', '.join(unsupported)}, which ringtrain does not apply: evaluate it with peft "
                "directly, or export it merged (merge_and_unload) and point model.path at that folder"]
    trained_on = peft_config.get("base_model_name_or_path")
    fix = f"point model.path at the base model it was trained on{f' ({trained_on})' if trained_on else ''}"
    if identity is not None:
        problem = identity_problem(identity, base_identity(cfg.model, cfg.train.seed), where, fix)
        if problem:
            return [problem]
    try:
        probe = copy.deepcopy(lm)
        apply_adapters(probe, adapted.peft)
    except Exception as e:  # noqa: BLE001
        return [f"{where} does not fit {type(lm).__name__}: {_reason(e)}: {fix}"]
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    for name, p in probe.named_parameters():
        if p.requires_grad and saved.get(peft_key(name), list(p.shape)) != list(p.shape):
            return [f"{where} was trained on another base model: {peft_key(name)} is {saved[peft_key(name)]} in the "
                    f"adapter and {list(p.shape)} in the model: {fix}"]
    return []
