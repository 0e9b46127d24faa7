"""Weights in and out of Hugging Face folders with no full copy of the model on any rank.

`build_causal_lm` builds the model on the meta device and parallelises it first (FSDP2 turns each parameter into a
sharded DTensor), then `to_empty` allocates only this rank's shards and `load_weights` fills them:

- a local folder of safetensors: DCP plans, for each tensor, the slice this rank holds, and `SliceReader` (DCP's
  `HuggingFaceStorageReader` with positioned reads instead of a memory map) reads just those bytes; measured
  per-rank peaks are in docs/benchmarks.md;
- anything else (`pytorch_model.bin` weights, checkpoints whose tensor names need transformers' key conversion, a
  hub name): rank 0 loads the model with `from_pretrained` and `set_model_state_dict(broadcast_from_rank0=True)`
  sends one tensor at a time; every rank keeps its shard. Only rank 0 then holds the whole model;
- random init (model.arch): every rank initialises one module at a time, at full size, with transformers' own
  `_init_weights` from the same seed, and keeps its shard: the same weights whatever the world size.

With LoRA adapters (`ringtrain.model.adapters`), peft moves a wrapped layer's weights under `base_layer`: loading
maps those names back to the base model's, and the adapters are initialised by peft's own init after the base
weights, one layer at a time like the rest.

Non-persistent buffers (rotary `inv_freq` after RoPE scaling, Gemma's `embed_scale`) are in no checkpoint: they are
computed the way `from_pretrained` computes them, by `_init_weights` on their module.

`export_hf_folder` writes the opposite way: DCP's `HuggingFaceStorageWriter` has every rank write its own shards,
then consolidates them into HF-named safetensors files one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from ringtrain.log import get_logger
from ringtrain.parallel.agree import agree

logger = get_logger(__name__)

# Tensors of a peft LoRA layer that belong to the adapter, not to the base layer it wraps (`ringtrain.model.adapters`).
ADAPTER_TENSOR_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter_tensor(name: str) -> bool:
    """Whether a parameter name of an adapted model names an adapter tensor (peft's LoRA layers' own tensors)."""
    parts = name.split(".")
    return any(part in ADAPTER_TENSOR_PARTS for part in parts)


def base_name(name: str) -> str:
    """The base model's name of a tensor of the adapted model: peft moves a wrapped layer's weights under
    `base_layer` (`...q_proj.base_layer.weight` is the base model's `...q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's tensors of an adapted model's state, under the base model's names."""
    return {base_name(name): t for name, t in state.items() if not is_adapter_tensor(name)}


def is_adapted(lm: nn.Module) -> bool:
    """Whether `lm` holds adapter tensors (peft injected adapters into it); imports nothing of peft."""
    return any(is_adapter_tensor(name) for name, _ in lm.named_parameters())


# The size above which the export starts a new safetensors file: the Hub's customary shard size (transformers'
# own default grew to 50 GB, which puts an 8B bf16 model in one 16 GB file that one rank must write).
EXPORT_SHARD_BYTES = 5 * 2**30
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def unique_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, each tensor once: a tied weight (lm_head = embed_tokens) keeps its
    first name, the one transformers' `save_pretrained` keeps. FSDP2 preserves the tie, so this holds sharded too."""
    seen: set[int] = set()
    out = {}
    for name, tensor in lm.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach()
    return out


def checkpoint_shapes(folder: str | os.PathLike) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the safetensors files of `folder`, from their headers (no data read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def _safetensors_data(file: str) -> tuple[int, dict[str, Any]]:
    """(where the data section of a safetensors file starts, its header): an 8-byte little-endian header length, then
    the JSON header mapping each name to its dtype, shape and byte range within the data section."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


class SliceReader(HuggingFaceStorageReader):
    """DCP's `HuggingFaceStorageReader`, reading each rank's slice with plain positioned reads instead of a memory
    map: an FSDP2 shard is a run of rows, so a contiguous byte range of the file. safetensors' memory map counts
    every page it touches (and the kernel's read-ahead around them) in the rank's resident memory: on 4 ranks of a
    246M fp32 model that was 0.70x the model's bytes per rank instead of its 0.25x shard (docs/benchmarks.md).
    A slice that is not a run of rows (another sharding) goes through the memory map as before."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        headers: dict[str, tuple[int, dict[str, Any]]] = {}
        by_mmap = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.relative_path not in headers:
                headers[info.relative_path] = _safetensors_data(info.relative_path)
            start, header = headers[info.relative_path]
            entry = header[req.storage_index.fqn]
            rows_only = list(req.storage_offsets[1:]) == [0] * (len(entry["shape"]) - 1) and \
                list(req.lengths[1:]) == entry["shape"][1:]
            if not rows_only:
                by_mmap.append(req)
                continue
            _read_rows(info.relative_path, start + entry["data_offsets"][0], entry["shape"], req, planner, info.dtype)
        if by_mmap:
            super().read_data(dataclasses.replace(plan, items=by_mmap), planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut


def _read_rows(file: str, data_start: int, shape: list[int], req: Any, planner: Any, dtype: torch.dtype) -> None:
    """Read rows [offset, offset + length) of a stored tensor into the planner's target (directly when the dtypes
    match and the target is contiguous CPU memory, else through one slice-sized buffer)."""
    import math

    target = planner.resolve_tensor(req).detach()
    rows = req.lengths[0] if req.lengths else 1
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    direct = target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
    buf = target if direct else torch.empty(target.shape, dtype=dtype)
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    with open(file, "rb", buffering=0) as f:
        f.seek(data_start + (req.storage_offsets[0] if req.lengths else 0) * row_bytes)
        done = 0
        while done < rows * row_bytes:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{file} ended inside {req.storage_index.fqn}: the file is truncated")
            done += n
    if not direct:
        target.copy_(buf)
    planner.commit_tensor(req, target)


def load_weights(lm: nn.Module, template: nn.Module, path: str | None, device: torch.device,
                 from_pretrained: Callable[[], nn.Module] | None = None) -> str:
    """Fill `lm`'s allocated (possibly sharded) tensors; collective. Returns the loader used.

    `template` is an unparallelised meta-device twin of `lm` (random init and non-persistent buffers come from it);
    `path` is model.path, None for a random init; `from_pretrained()` builds the full model for the rank-0 fallback.
    """
    if path is None:
        init_from_template(lm, template, device)
        return "random init"
    want = base_state(unique_state(lm))  # the base model's names: a folder holds no adapter
    # Rank 0 judges the folder for all: ranks that chose different loaders would wait in different collectives.
    missing = agree(lambda: _unreadable_by_slices(Path(path), want), what="choosing how to load model.path")
    if not missing:
        import torch.distributed.checkpoint as dcp

        # Each rank requests its own shard of every tensor; the reader reads only those slices from the files.
        dcp.load(want, storage_reader=SliceReader(path))
        loader = "safetensors slices"
    else:
        logger.warning("model.path=%s cannot be read shard by shard (%s%s): rank 0 loads the whole model with "
                       "from_pretrained and broadcasts it; for sharded loading save the model as safetensors "
                       "(save_pretrained) in a local folder", path, ", ".join(missing[:3]),
                       " ..." if len(missing) > 3 else "")
        _load_broadcast(lm, from_pretrained)
        loader = "rank-0 broadcast"
    init_from_template(lm, template, device, non_persistent_buffers_only=True)
    return loader


def _unreadable_by_slices(folder: Path, want: dict[str, torch.Tensor]) -> list[str]:
    """Why `folder` cannot be read slice by slice into `want` (empty when it can): the tensors it lacks."""
    if not folder.is_dir():
        return ["not a local folder"]
    if not any(folder.glob("*.safetensors")):
        return ["no *.safetensors files"]
    present = checkpoint_shapes(folder)
    return [f"no tensor {name}" for name in want if name not in present]


def _load_broadcast(lm: nn.Module, from_pretrained: Callable[[], nn.Module]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    full = from_pretrained().state_dict() if not distributed or dist.get_rank() == 0 else {}
    adapted = is_adapted(lm)
    if adapted:  # the base model's names -> the adapted model's; its adapters are initialised afterwards
        names = {base_name(n): n for n in lm.state_dict() if not is_adapter_tensor(n)}
        full = {names.get(k, k): v for k, v in full.items()}
    if not distributed:
        lm.load_state_dict(full, strict=not adapted)
        return
    set_model_state_dict(lm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                            strict=not adapted))


def _post_order(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, module, the PreTrainedModel whose `_init_weights` applies) in the order transformers'
    `initialize_weights` visits them: children first, a nested PreTrainedModel with its own init function."""
    from transformers import PreTrainedModel

    def visit(name: str, module: nn.Module, owner: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        for child_name, child in module.named_children():
            yield from visit(f"{name}{child_name}.", child, child if isinstance(child, PreTrainedModel) else owner)
        yield name, module, owner

    yield from visit("", model, model)


def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor `full` into `target` (a sharded DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds the same `full`, so each just keeps its slice (no communication).
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(full)


@torch.no_grad()
def init_from_template(lm: nn.Module, template: nn.Module, device: torch.device,
                       non_persistent_buffers_only: bool = False) -> None:
    """Initialise `lm`'s tensors module by module from transformers' `_init_weights`, run on `template` (the
    unparallelised meta twin): each module is materialised at full size on `device`, initialised, copied into this
    rank's shards and freed, so a rank holds its shards plus one module. Every rank draws the same numbers in the
    same order, so the weights do not depend on the world size.

    `_init_weights(module)` is transformers' per-module hook; the public `initialize_weights()` would need the whole
    model materialised at once."""
    from transformers import initialization

    targets = dict(lm.named_parameters(remove_duplicate=False)) | dict(lm.named_buffers(remove_duplicate=False))
    non_persistent = set(dict(template.named_buffers())) - set(template.state_dict())
    done: set[int] = set()
    # transformers' own init functions replace torch.nn.init's meanwhile, as in its initialize_weights.
    with initialization.guard_torch_init_functions():
        for prefix, module, owner in _post_order(template):
            tensors = [n for n, _ in module.named_parameters(recurse=False)] + \
                      [n for n, _ in module.named_buffers(recurse=False)]
            if non_persistent_buffers_only:
                tensors = [n for n in tensors if prefix + n in non_persistent]
            # Adapters are peft's to initialise (`init_adapters`); skipping them keeps the base weights those of
            # the same model without adapters.
            tensors = [n for n in tensors if not is_adapter_tensor(prefix + n)]
            # A tied weight is initialised once, by the module that comes first (the embedding).
            tensors = [n for n in tensors if id(targets[prefix + n]) not in done]
            if not tensors:
                continue
            # On the run's device and its RNG: on a GPU, a host init took 35-60 s for a 1.1B model (benchmarks.md).
            module.to_empty(device=device, recurse=False)
            owner._init_weights(module)
            for n in tensors:
                target = targets[prefix + n]
                copy_into(target, getattr(module, n))
                done.add(id(target))
            module.to_empty(device="meta", recurse=False)


def _shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, int]:
    """Tensor name -> output file index (1-based), in state order, starting a new file past `max_shard_bytes`."""
    plan, index, size = {}, 1, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()  # a DTensor's numel is the full tensor's
        if size and size + nbytes > max_shard_bytes:
            index, size = index + 1, 0
        plan[name] = index
        size += nbytes
    return plan


def uses_key_conversion(lm: nn.Module) -> bool:
    """Whether transformers renames or converts this model's tensors when it saves (fused MoE experts, ...)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return bool(get_model_conversion_mapping(lm, add_legacy=False))


EXPORT_RECORD = "ringtrain_export.json"  # what a trainer's export records about itself (the step, the run)


def replace_folder(new: Path, old: Path) -> None:
    """Put folder `new` in place of `old`: the old one is renamed aside first and deleted last, so a kill at any point
    leaves a complete folder under one of the two names (`<old>.old` while the swap is under way)."""
    aside = old.with_name(old.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def export_hf_folder(lm: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
                     max_shard_bytes: int = EXPORT_SHARD_BYTES, state: dict[str, torch.Tensor] | None = None,
                     record: dict[str, Any] | None = None) -> None:
    """Write `lm` (sharded or not) as a plain HF folder that `from_pretrained` loads; collective.

    Every rank writes its own shards (DCP's `HuggingFaceStorageWriter`), then rank 0 consolidates them into
    `model-0000i-of-0000N.safetensors` files and their index, one full tensor in memory at a time (a model within one
    file is named `model.safetensors`, as `save_pretrained` names it). The folder is written next to `out_dir` and
    swapped in at the end, so no stale shard of an earlier export survives. `state`: the tensors to write instead of
    `lm`'s own (the LoRA-merged weights, `ringtrain.model.adapters.merged_state`). `record`: JSON written into the folder
    as EXPORT_RECORD (the trainer's step and run id), so a folder says what it holds.
    """
    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if uses_key_conversion(lm):
        if state is not None:  # `validate` refuses checkpoint.export_merged for such a model first
            raise ValueError(f"{type(lm).__name__} converts its tensor names when saved: a merged LoRA "
                             "export is not supported for it; export the adapter (the default)")
        _export_gathered(lm, out_dir, tokenizer, rank, record)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    state = unique_state(lm) if state is None else state
    plan = _shard_plan(state, max_shard_bytes)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    writer = HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=plan, save_distributed=True,
                                      enable_consolidation=True)
    dcp.save(state, storage_writer=writer)  # rank 0 consolidates inside, before this returns on any rank
    if rank == 0:
        shutil.rmtree(tmp / "sharded")  # the per-rank pieces, now consolidated
        if max(plan.values()) == 1:
            os.replace(tmp / "model-00001-of-00001.safetensors", tmp / SINGLE_FILE)
            (tmp / INDEX_FILE).unlink()
        _write_side_files(lm, tmp, tokenizer, next(iter(state.values())).dtype)
        if record is not None:
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        replace_folder(tmp, out_dir)
        logger.info("exported the model to %s (%d safetensors file(s))", out_dir, max(plan.values()))
    if dist.is_initialized():
        dist.barrier()


def _write_side_files(lm: nn.Module, folder: Path, tokenizer: Any, dtype: torch.dtype) -> None:
    """config.json (with the architecture and dtype `save_pretrained` records), generation config, tokenizer."""
    import copy

    config = copy.deepcopy(lm.config)
    config.architectures = [type(lm).__name__.removeprefix("FSDP")]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    if lm.can_generate() and getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(folder)
    if lm.is_remote_code():  # trust_remote_code models: their modeling files travel with the folder
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(lm, folder, config=config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        apply_special_tokens(folder, tokenizer)


SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def apply_special_tokens(folder: Path, tokenizer: Any) -> None:
    """Make config.json and generation_config.json name the tokenizer's own bos / eos / pad ids (null where it has
    none). A model built from a config alone keeps its family's defaults (Llama's bos=1, eos=2), which another
    tokenizer gives other meanings: the byte tokenizer's 2 is <unk>, so generate() would never stop at EOS."""
    ids = {key: getattr(tokenizer, key, None) for key in SPECIAL_TOKEN_KEYS}
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        data.update(ids)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _export_gathered(lm: nn.Module, out_dir: Path, tokenizer: Any, rank: int, record: dict[str, Any] | None) -> None:
    """Models whose saved names differ from their module names go through `save_pretrained`, which converts them:
    the full state dict is gathered on rank 0 for that."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    logger.warning("%s converts its tensor names when saved: gathering the whole model on rank 0 to export it",
                   type(lm).__name__)
    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=full)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            apply_special_tokens(tmp, tokenizer)
        if record is not None:
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        replace_folder(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
