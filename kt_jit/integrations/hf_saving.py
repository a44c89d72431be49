"""Saving a transformers model whose experts kt_jit runs, packed as they are.

``save_pretrained(model, path)`` writes an ordinary transformers checkpoint of everything but the
routed experts' packed weights (transformers' own ``save_pretrained``: shards, the model's key
names; the experts' LoRA adapters are in it), plus one
:meth:`kt_jit.MoEExperts.save` file per experts module under
``path/kt_jit_experts/``, and records both in ``config.json``'s ``quantization_config``
(``quant_method "kt_jit"``). :func:`kt_jit.integrations.hf_loading.from_pretrained` reads it back
with no packing or quantization: each experts file is memory-mapped (page cache shared between
processes, not the process's own memory), so a second start of a job, or a second process serving
the same model, costs the other weights' load only.

Models from ``hf_loading.from_pretrained`` and ``patch_experts`` get this as their
``model.save_pretrained`` (:func:`install_save`), so transformers' ``Trainer`` writes such
checkpoints; the experts files of a save are hard links to an earlier save's while the experts are
unchanged (a file's id, in its metadata and in ``config.json``, says which save wrote it).

The adapters load back with the model (bf16, trainable: a fine-tune resumes from the checkpoint)
unless the load asks for another rank or alpha (fresh adapters) or ``lora=False`` (none). For a
PEFT adapter file of them see :func:`kt_jit.integrations.peft_adapter.save_peft_adapter`.
"""

from __future__ import annotations

import os
import uuid
import weakref

from torch import nn

from ..moe.checkpoint import packed_experts_files
from ..moe.weights import MoEExperts
from .hf import KTJitExperts

PACKED_DIR = "kt_jit_experts"
SAVE_ID_KEY = "kt_jit_save_id"  # (metadata of each experts file: its id, also named in config.json)

# experts -> [(real path, id), ...] of files holding exactly them (written or linked by a save, or the
# file they are memory-mapped from), newest last: a later save hard-links one instead of writing them
_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def file_id(path: str | os.PathLike) -> str | None:
    """The id an experts file was saved with (None if it has none)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return (f.metadata() or {}).get(SAVE_ID_KEY)


def remember_file(experts: MoEExperts, path: str | os.PathLike, saved_id: str | None) -> None:
    """Note that the file ``path`` (with id ``saved_id``) holds exactly ``experts`` (its real path:
    a Hub cache's symlink would be hard-linked as a symlink)."""
    if saved_id is not None:
        known = _FILES.setdefault(experts, [])
        entry = (os.path.realpath(path), saved_id)
        if entry in known:
            known.remove(entry)
        known.append(entry)


def _has_id(path: str, want: str) -> bool:
    try:
        return file_id(path) == want
    except Exception:  # (missing, replaced, unreadable: not the file it was)
        return False


def _write_experts(experts: MoEExperts, target: str) -> str:
    """Put ``experts`` in the file ``target`` and return its id: a hard link to the newest file
    known to hold them (unchanged since: the same id; e.g. an earlier checkpoint's, which a
    Trainer may have deleted meanwhile), else a new save."""
    known = _FILES.get(experts, [])
    while known and not _has_id(*known[-1]):  # (only the newest valid one is used: older ones stay unread)
        known.pop()
    if known:
        source, source_id = known[-1]
        if os.path.exists(target) and os.path.samefile(source, target):
            return source_id
        tmp = f"{target}.link{os.getpid()}"
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
            remember_file(experts, target, source_id)
            return source_id
        except OSError:  # (another file system, no hard links: write it)
            if os.path.lexists(tmp):
                os.remove(tmp)
    new_id = uuid.uuid4().hex
    experts.save(target, metadata={SAVE_ID_KEY: new_id})
    remember_file(experts, target, new_id)
    return new_id


def _weight_files(path: str) -> dict[str, tuple[int, int, int]]:
    """The top-level model weight files in the directory ``path``, with (inode, mtime, size)."""
    if not os.path.isdir(path):
        return {}
    found = {}
    for f in os.listdir(path):
        full = os.path.join(path, f)
        if (os.path.isfile(full) and f.startswith(("model", "pytorch_model"))
                and f.endswith((".safetensors", ".bin", ".index.json"))):
            st = os.stat(full)
            found[f] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _is_packed_checkpoint(path: str) -> bool:
    """Whether the directory ``path`` holds a checkpoint this module wrote."""
    try:
        return packed_experts_files(path) is not None
    except ValueError:  # (an unreadable config.json: not one this module wrote)
        return False


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """Write ``model`` (a transformers model with :class:`KTJitExperts` modules, from
    :func:`~kt_jit.integrations.hf_loading.from_pretrained` or
    :func:`~kt_jit.integrations.hf.patch_experts`) to the directory ``path`` with its experts packed
    as they are (see the module docstring); ``kwargs`` go to transformers' ``save_pretrained``
    (e.g. ``max_shard_size``; the model's names are kept, ``save_original_format=False``, unless
    given: transformers' Trainer resumes by loading the state dict as it is). The adapters are saved
    with the model, each with its rank and alpha, the model's own state dict (a
    ``state_dict`` argument, e.g. the Trainer's, is not used). ``path`` must be new, empty, or hold
    an earlier save of this function (whose files are replaced): a directory with another
    checkpoint (e.g. the one the model was loaded from) is refused. A rank other than the main one
    of a distributed run (``is_main_process=False``) writes nothing. Raises ValueError for a model
    without KTJitExperts modules, with experts packed in different modes, or with PEFT layers
    (save ``model.merge_and_unload()``, the adapters with ``save_peft_adapter``)."""
    if (hasattr(model, "peft_config") and hasattr(model, "get_base_model") or getattr(
            model, "_hf_peft_config_loaded", False) or any(".base_layer." in n for n, _ in model.named_parameters())):
        raise ValueError("this model holds PEFT layers: save model.merge_and_unload() (PEFT's adapters merged), "
                         "and the adapters themselves with save_peft_adapter")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, KTJitExperts)}
    if not modules:
        raise ValueError(f"{type(model).__name__} has no KTJitExperts modules: use its own save_pretrained")
    adapters = {name: m.lora for name, m in modules.items() if m.lora is not None}
    kwargs.pop("state_dict", None)
    kwargs.setdefault("save_original_format", False)
    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub: save to a local directory, then upload it whole (huggingface_hub."
                         "upload_folder): transformers would upload only the files it wrote itself")
    modes = {(m.experts.quant, m.experts.group_size) for m in modules.values()}
    if len(modes) != 1:
        raise ValueError(f"the experts are packed in different modes {sorted(modes)}; one checkpoint holds one")
    if not kwargs.get("is_main_process", True):  # (another rank of a distributed run writes the files)
        return
    path = os.fspath(path)
    before = _weight_files(path)
    if before and not _is_packed_checkpoint(path):
        raise ValueError(f"{path} holds another checkpoint ({sorted(before)[0]}, ...): save into a new or empty "
                         "directory (over the checkpoint the model came from, its original experts would be lost)")
    quant, group_size = modes.pop()
    files = {name: f"{PACKED_DIR}/{name}.safetensors" for name in modules}
    os.makedirs(os.path.join(path, PACKED_DIR), exist_ok=True)
    # (each file's id is in config.json too: a load refuses files of another save)
    ids = {name: _write_experts(module.experts, os.path.join(path, files[name])) for name, module in modules.items()}
    for stale in set(os.listdir(os.path.join(path, PACKED_DIR))) - {os.path.basename(f) for f in files.values()}:
        if stale.endswith(".safetensors"):
            os.remove(os.path.join(path, PACKED_DIR, stale))
    kinds = {name: (a.rank, a.alpha) for name, a in adapters.items()}
    rank, alpha = max(kinds.values(), key=list(kinds.values()).count) if kinds else (16, 32.0)
    packed_config = {"quant_method": "kt_jit", "quant": quant, "group_size": group_size or 128,
                     "rank": rank, "alpha": alpha, "lora": bool(adapters), "fp8_block": None,
                     "packed_experts": files, "experts_ids": ids, "adapters": sorted(adapters),
                     "adapter_kinds": {name: list(k) for name, k in kinds.items() if k != (rank, alpha)}}

    config = model.config
    had_config = "quantization_config" in config.__dict__
    old_config = config.__dict__.get("quantization_config")
    quantizer = getattr(model, "hf_quantizer", None)
    conversions = getattr(model, "_weight_conversions", None)
    config.quantization_config = packed_config
    if quantizer is not None:
        quantizer.saving = True  # (kt_jit's quantizer: serializable only through this function)
    if conversions is not None and hasattr(quantizer, "saving_conversions"):
        model._weight_conversions = quantizer.saving_conversions(conversions)
    try:
        # (transformers' own method: the model's is a _PackedSave; the experts are in no state dict)
        type(model).save_pretrained(model, path, **kwargs)
    finally:
        if conversions is not None:
            model._weight_conversions = conversions
        if quantizer is not None:
            quantizer.saving = False
        if had_config:
            config.quantization_config = old_config
        else:
            del config.quantization_config
    # (transformers removes an earlier save's shards, not its single file or index: e.g. a save in
    # one file, then sharded, would leave model.safetensors, which loads first. Files this save did
    # not write are the earlier save's.)
    after = _weight_files(path)
    for stale in (f for f, stat in before.items() if after.get(f) == stat):
        os.remove(os.path.join(path, stale))


class _PackedSave:
    """A kt_jit model's ``save_pretrained`` (see :func:`install_save`); an object, not a bound
    method, so that the model still pickles (and a deep copy saves the copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        return save_pretrained(self.model, save_directory, **kwargs)


def install_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained(path, ...)`` write the packed checkpoint of
    :func:`save_pretrained` (what transformers' ``Trainer`` calls for its checkpoints); the experts
    files of a checkpoint are hard links to an earlier one's while the experts are unchanged (where
    the file system allows)."""
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = _PackedSave(model)


def uninstall_save(model: nn.Module) -> None:
    """Undo :func:`install_save` (a plain transformers model again)."""
    if isinstance(model.__dict__.get("save_pretrained"), _PackedSave):
        del model.save_pretrained
