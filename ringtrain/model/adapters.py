"""LoRA adapters through the `peft` library: applied to the untouched transformers model, on the meta device, as the
model builder's first step; their initialisation, the names they give the base weights, the base model's identity,
and the peft adapter folder a run exports.

`peft.inject_adapter_in_model` wraps each target linear layer in place (`q_proj` -> `q_proj.base_layer` plus
`q_proj.lora_A.default` / `lora_B.default`) and freezes every other weight; the model stays the transformers class,
so ring attention, tiled MLP, recompute and FSDP2 see the modules they know. `trainable_modules` (LongLoRA's
embeddings and norms) train in place, as plain parameters with `requires_grad`; the export writes them as peft's
`modules_to_save`, so `PeftModel.from_pretrained(base, folder)` reproduces the trained model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ringtrain.log import get_logger
from ringtrain.model.weights import (
    ADAPTER_TENSOR_PARTS,
    base_name,
    copy_into,
    is_adapter_tensor,
    unique_state,
)

if TYPE_CHECKING:
    from ringtrain.config import AdapterConfig, ModelConfig, TrainConfig

logger = get_logger(__name__)

ADAPTER_NAME = "default"  # peft's name of the one adapter a run trains
PEFT_PREFIX = "base_model.model."  # peft's key prefix for a causal LM's tensors in adapter_model.safetensors
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_IDENTITY = "base_model.json"  # written next to peft's files: which base model the adapter was trained on


def lora_config(cfg: AdapterConfig, modules_to_save: list[str] | None = None, base_path: str | None = None) -> Any:
    """peft's LoraConfig for the `peft:` section (modules_to_save and the base model's path for an export)."""
    from peft import LoraConfig

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      modules_to_save=modules_to_save or None, base_model_name_or_path=base_path,
                      task_type="CAUSAL_LM")


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def resolve_trainable_modules(lm: nn.Module, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(the dotted names of the modules `peft.trainable_modules` selects, the entries that select none)."""
    modules = dict(lm.named_modules())
    inside_adapters = [n for n, m in modules.items() if n and _is_tuner(m)]
    names: list[str] = []
    unmatched = []
    for entry in wanted:
        if entry == "embeddings":
            embed = lm.get_input_embeddings()
            found = [n for n, m in modules.items() if m is embed]
        elif entry == "norms":
            found = [n for n, m in modules.items() if _is_norm(m)]
        else:
            found = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
        # Modules inside an adapted layer (its base layer, its adapters) are not base modules to train.
        found = [n for n in found if not any(n.startswith(t + ".") for t in inside_adapters)]
        if not found:
            unmatched.append(entry)
        names += [n for n in found if n not in names]
    return names, unmatched


def _is_tuner(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def apply_adapters(lm: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Inject LoRA into `lm` in place (peft), freeze every base weight but `cfg.trainable_modules`; returns the
    names of the modules trained in full. Works on the meta device: adapters are initialised later, with the
    base weights (`init_adapters`)."""
    from peft import inject_adapter_in_model

    # low_cpu_mem_usage: the adapters are created on the meta device, uninitialised (no host memory, no draw from
    # the RNG that the base weights' init then uses).
    inject_adapter_in_model(lora_config(cfg), lm, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True)
    names, unmatched = resolve_trainable_modules(lm, cfg.trainable_modules)
    if unmatched:  # model_problems reports this before a run starts; a direct caller gets the same line
        raise ValueError(f"peft.trainable_modules: {', '.join(unmatched)} select(s) no module of {type(lm).__name__}")
    modules = dict(lm.named_modules())
    for name in names:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    return names


@contextlib.contextmanager
def adapters_disabled(lm: nn.Module) -> Iterator[None]:
    """Run `lm` as its base model inside the block: every peft layer's adapters off (peft's public
    `enable_adapters`), then on again with the trainable flags they had. The DPO reference of an adapter run."""
    tuners = [m for m in lm.modules() if _is_tuner(m)]
    trainable = [(p, p.requires_grad) for m in tuners for p in m.parameters()]
    for m in tuners:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in tuners:
            m.enable_adapters(True)
        for p, flag in trainable:  # enable_adapters(True) marks the adapters trainable; keep what was
            p.requires_grad_(flag)


def trained_module_names(lm: nn.Module) -> list[str]:
    """The base modules of an adapted model whose own parameters train (LongLoRA's embeddings and norms)."""
    out = []
    for name, module in lm.named_modules():
        if any(part in ADAPTER_TENSOR_PARTS or part == "base_layer" for part in name.split(".")):
            continue  # inside an adapted layer
        own = list(module.parameters(recurse=False))
        if name and own and all(p.requires_grad for p in own):
            out.append(name)
    return out


@torch.no_grad()
def adapter_init_tensors(layer: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """A meta-device peft LoRA layer's adapter tensors, initialised at full size on `device` by peft's own
    `reset_lora_parameters` (A as nn.Linear's default, B zero, so the adapted model starts as the base model);
    names relative to the layer. The layer's adapter modules go back to the meta device after."""
    holders = [getattr(layer, part) for part in ADAPTER_TENSOR_PARTS if hasattr(layer, part)]
    for holder in holders:
        holder.to_empty(device=device)
    layer.reset_lora_parameters(ADAPTER_NAME, True)
    out = {f"{part}.{name}": t.detach().clone() for part in ADAPTER_TENSOR_PARTS if hasattr(layer, part)
           for name, t in getattr(layer, part).named_parameters()}
    for holder in holders:
        holder.to_empty(device="meta")
    return out


@torch.no_grad()
def init_adapters(lm: nn.Module, template: nn.Module, device: torch.device) -> None:
    """Initialise `lm`'s LoRA adapters with peft's own init, layer by layer on `template` (the unparallelised meta
    twin, adapted the same way) at full size, keeping this rank's shards: the same adapters on every world size.
    Called after the base weights are loaded or initialised, so those are the model's without adapters."""
    from peft.tuners.lora import LoraLayer

    targets = dict(lm.named_parameters(remove_duplicate=False))
    for prefix, layer in template.named_modules():
        if isinstance(layer, LoraLayer):
            for name, full in adapter_init_tensors(layer, device).items():
                copy_into(targets[f"{prefix}.{name}"], full)


# --------------------------------------------------------------------------------------------------
# The base model's identity: what an adapter checkpoint or export is trained on.


def _sample_digest(h: Any, file: Path, sample_bytes: int = 1 << 20) -> None:
    """Feed the safetensors header (names, dtypes, shapes, offsets) and the first and last MiB of the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(n))
        h.update(f.read(sample_bytes))
        f.seek(max(8 + n, size - sample_bytes))
        h.update(f.read(sample_bytes))


def base_identity(model: ModelConfig, seed: int) -> dict[str, Any]:
    """Which base model a run adapts: model.path or model.arch, and a digest of its config and of its weights' index
    (config.json, each safetensors file's header and a sample of its bytes, so two folders of one architecture with
    other weights differ; no full read). A hub name is its name; a random-init base (model.arch) is its arch,
    model.config and train.seed."""
    h = hashlib.sha256()
    folder = Path(model.path).expanduser() if model.path is not None else None
    if folder is not None and folder.is_dir():
        config = folder / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for file in sorted(folder.glob("*.safetensors")):
            h.update(file.name.encode())
            _sample_digest(h, file)
        where = str(folder.resolve())
    elif folder is not None:
        h.update(model.path.encode())
        where = model.path
    else:
        h.update(json.dumps({"arch": model.arch, "config": model.config, "seed": seed}, sort_keys=True,
                            default=str).encode())
        where = None
    h.update(json.dumps(model.config, sort_keys=True, default=str).encode())
    return {"path": where, "arch": model.arch, "digest": h.hexdigest()[:16]}


def identity_problem(saved: dict[str, Any], now: dict[str, Any], what: str, fix: str) -> str | None:
    """One line when `saved` (an adapter's or a checkpoint's base) is not the base model `now` names."""
    if saved.get("digest") == now.get("digest"):
        return None
    base = saved.get("path") or f"model.arch={saved.get('arch')}"
    current = now.get("path") or f"model.arch={now.get('arch')}"
    return (f"{what} was trained on another base model ({base}, digest {saved.get('digest')}) than {current} "
            f"(digest {now.get('digest')}): {fix}")


# --------------------------------------------------------------------------------------------------
# Export: a peft adapter folder.


def peft_key(name: str) -> str:
    """The key of an adapted model's trainable tensor in peft's adapter_model.safetensors."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")


def export_adapter(lm: nn.Module, cfg: AdapterConfig, out_dir: str | os.PathLike, identity: dict[str, Any],
                   base_path: str | None, tokenizer: Any = None) -> None:
    """Write the trained adapters and trainable modules of `lm` (sharded or not) as a peft adapter folder;
    collective. Only the trainable tensors are gathered, into rank 0's host memory (one tensor on the device at a
    time); the base model never is.

    Trainable base modules become peft's `modules_to_save`. With a tied output head (lm_head = embed_tokens), a
    trained embedding also trains the head: the head is saved as a module of its own, so peft, which gives the
    saved embedding its own copy, computes the same logits."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                             ignore_frozen_params=True))
    if rank == 0:
        modules = trained_module_names(lm)
        tensors = {peft_key(n): t.contiguous() for n, t in full.items()}
        head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
        if head is not None and head.weight is embed.weight and embed.weight.requires_grad:
            head_name = next(n for n, m in lm.named_modules() if m is head)
            modules.append(head_name)
            embed_name = next(n for n, m in lm.named_modules() if m is embed)
            tensors[peft_key(f"{head_name}.weight")] = tensors[peft_key(f"{embed_name}.weight")].clone()
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora_config(cfg, modules, base_path).save_pretrained(str(tmp))
        (tmp / BASE_IDENTITY).write_text(json.dumps(identity, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        logger.info("exported the adapter (%d tensors, %d modules trained in full) to %s", len(tensors),
                    len(modules), out_dir)
    if dist.is_initialized():
        dist.barrier()


def merged_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors with every LoRA update merged in (W + scaling * B @ A), under the base names, each
    as sharded as `lm`'s weight; for `export_hf_folder`. One full-size update at a time is built on each rank."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor, distribute_tensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    merged: dict[str, torch.Tensor] = {}
    for prefix, layer in lm.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            continue
        weight = layer.get_base_layer().weight
        with torch.no_grad():
            a = full(layer.lora_A[ADAPTER_NAME].weight).float()
            b = full(layer.lora_B[ADAPTER_NAME].weight).float()
            delta = (b @ a * layer.scaling[ADAPTER_NAME]).to(weight.dtype)  # [out, in], nn.Linear's layout
            if isinstance(weight, DTensor):
                local = weight.to_local() + distribute_tensor(delta, weight.device_mesh, weight.placements,
                                                              src_data_rank=None).to_local()
                out = DTensor.from_local(local, weight.device_mesh, weight.placements, shape=weight.shape,
                                         stride=weight.stride())
            else:
                out = weight.detach() + delta
        merged[f"{prefix}.weight"] = out
    return {base_name(n): merged.get(base_name(n), t) for n, t in unique_state(lm).items() if not is_adapter_tensor(n)}


# --------------------------------------------------------------------------------------------------
# Loading an exported adapter (`ringtrain eval` with model.adapter).


def read_adapter_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(adapter_config.json, base_model.json or None) of an adapter folder; OSError / ValueError when unreadable."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    identity = folder / BASE_IDENTITY
    return config, json.loads(identity.read_text()) if identity.is_file() else None


def adapter_settings(peft_config: dict[str, Any]) -> dict[str, Any]:
    """The `peft:` section's values that rebuild the model an adapter_config.json describes."""
    targets = peft_config.get("target_modules")
    targets = ["all-linear"] if targets == "all-linear" else sorted(targets if isinstance(targets, list) else [targets])
    return {"method": "lora", "r": int(peft_config["r"]), "alpha": float(peft_config["lora_alpha"]),
            "dropout": 0.0, "target_modules": targets,
            "trainable_modules": list(peft_config.get("modules_to_save") or [])}


@torch.no_grad()
def load_adapter_weights(lm: nn.Module, folder: str | os.PathLike) -> None:
    """Fill an adapted model's trainable tensors (adapters, modules_to_save) from a peft adapter folder; every
    rank reads the (small) file and keeps its shards."""
    from safetensors import safe_open

    file = Path(folder) / ADAPTER_WEIGHTS
    targets = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        missing = [n for n in targets if peft_key(n) not in keys]
        if missing:
            raise ValueError(f"model.adapter={str(folder)!r} has no tensor {peft_key(missing[0])} "
                             f"({len(missing)} missing): it was not trained for this model")
        for name, target in targets.items():
            copy_into(target, f.get_tensor(peft_key(name)).to(target.dtype))


def with_adapter(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its `peft:` section rebuilt from the adapter folder model.adapter names (what `ringtrain eval`
    builds before loading the adapter's tensors)."""
    import dataclasses

    from ringtrain.config import AdapterConfig

    peft_config, _ = read_adapter_folder(cfg.model.adapter)
    return dataclasses.replace(cfg, peft=AdapterConfig(**adapter_settings(peft_config)))
