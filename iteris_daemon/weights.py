"""Where a base model's block weights live while the engine works on other blocks.

Three placements, one interface (``load(block, path)`` before a block is computed on,
``release(block)`` after):

- :class:`Resident`: the whole model sits on the compute device (small models);
- :class:`Offloaded`: the model sits in CPU memory and one block at a time is moved to
  the (GPU) device;
- :class:`Streamed`: only the modules outside the blocks (embeddings, final norm, heads)
  are loaded; each block is read from the memory-mapped safetensors checkpoint when it
  is needed and dropped afterwards, so peak memory does not grow with depth.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import malloc
from .errors import BaseModelError, first_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


class WeightsUnavailable(Exception):
    """The checkpoint cannot be streamed (the message says why); load it whole instead.

    ``checked``: the stream was refused after :func:`check_files`' checks, made on its own
    skeleton, so the whole load need not build a second skeleton (seconds and gigabytes for a
    70B model) to make them again."""

    checked = False


class Resident:
    name = "resident"

    def load(self, block: nn.Module, path: str) -> None:
        pass

    def release(self, block: nn.Module) -> None:
        pass


class Offloaded:
    """Blocks live in CPU memory and visit the device one at a time."""

    name = "cpu"

    def __init__(self, device: torch.device):
        self.device = device

    def load(self, block: nn.Module, path: str) -> None:
        block.to(self.device)

    def release(self, block: nn.Module) -> None:
        block.to("cpu")


class Streamed:
    """Blocks are read from the safetensors files when needed and dropped afterwards."""

    name = "disk"

    def __init__(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype

    def load(self, block: nn.Module, path: str) -> None:
        self.checkpoint.load_into(block, path, self.device, self.dtype)

    def release(self, block: nn.Module) -> None:
        for name, param in list(block.named_parameters()):
            _replace_tensor(block, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def _replace_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` of ``root`` to ``value`` (a frozen parameter)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@contextmanager
def _transformers_internals() -> Iterator[None]:
    """Streaming reads transformers' loading internals (its conversion mapping, how it ties
    weights): where a later 5.x moved one, the model loads whole, as transformers loads it."""
    try:
        yield
    except (ImportError, AttributeError, TypeError) as exc:
        raise WeightsUnavailable(f"cannot read this transformers' loading internals ({exc})") from None


class Checkpoint:
    """A local safetensors checkpoint, read into a model's parameters as ``from_pretrained``
    reads it: through the conversion mapping the model declares (transformers 5 renames
    some checkpoints' tensors and builds others' fused parameters from several, e.g. a
    Mixtral's experts, stored one by one, into one 3D parameter per block).

    Every tensor the model will read is checked against its file's header (the file is there,
    holds the tensor, in the shape the parameter needs here; in the kind of dtype it needs by
    ``recipes``, :func:`_checked_recipes`' of ``found`` for ``model``), so a broken checkpoint
    is one clear error before the merge starts, not a traceback or a silently broadcast weight
    when its block is reached.

    ``replaced``: parameters outside the blocks that the adapters' saved modules replace (a
    classifier head). One the checkpoint lacks (a reward model's ``score`` on a causal LM's
    checkpoint), or holds in another shape where transformers is told to ignore sizes
    (``ignore_mismatched``: a head of other labels), is listed in ``initialised``: the load
    initialises it as ``from_pretrained`` does. Those used to send the model to a whole
    load, in CPU memory.
    """

    def __init__(self, found: _Found, model: nn.Module, recipes: dict[str, _Recipe], ignore_mismatched: bool = False,
                 replaced: Iterable[str] = ()):
        self.model, self.recipes = model, recipes  # conversions read the model and its config
        self.names_from, self.files = found.names_from, found.files
        meta = model.state_dict()  # every name the model loads: tied parameters and persistent buffers too
        with _transformers_internals():
            ties = model.all_tied_weights_keys
        self.built_by = {target: first for first, recipe in self.recipes.items() for target in recipe.targets}
        # Every tensor the checkpoint holds is loaded, buffers too (from_pretrained loads a
        # router's e_score_correction_bias, BART's final_logits_bias over their initial zeros);
        # a parameter it lacks is tied to a stored partner (see load_streamed), or cannot stream.
        self.stored = [name for name in meta if name in self.built_by]
        self.made_in = {name: tensor.dtype for name, tensor in meta.items()}
        self.missing = [name for name, _param in model.named_parameters() if name not in self.built_by]
        filled = _filled_by_ties(ties, set(self.missing))
        replaced = set(replaced)
        self.initialised = [name for name in self.missing if name not in filled and name in replaced]
        unfilled = [name for name in self.missing if name not in filled and name not in replaced]
        if unfilled:
            raise WeightsUnavailable(f"the checkpoint has no tensor named {unfilled[0]} ({len(unfilled)} such)")
        expected: dict[str, torch.Tensor] = {}
        with _transformers_internals():
            for first in dict.fromkeys(self.built_by[name] for name in self.stored):
                expected.update(self._expected(first, meta))
        resizable = {self.recipes[name].sources[0][1]: name for name in replaced
                     if ignore_mismatched and name in self.recipes and self.recipes[name].converter is None}
        for key in _check_shapes(found, expected, ignore_mismatched, resizable):
            self.stored.remove(resizable[key])
            self.initialised.append(resizable[key])
        # Modules transformers keeps in float32 when it loads the model in half precision
        # (T5's ``wo``, whose activations overflow float16): the same here.
        strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        self.float32_modules = {torch.float16: strict | set(getattr(model, "_keep_in_fp32_modules", None) or ()),
                                torch.bfloat16: strict}

    def _expected(self, first: str, meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors that build recipe ``first``, each as a meta tensor of the
        shape and dtype it must have. A converted parameter's are those ``save_pretrained``
        writes it as (it reverts the conversion): one it needs and the checkpoint lacks (an
        expert's weight) is refused, naming it; one it would not write falls back to a
        whole-model load, which transformers judges."""
        from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

        recipe = self.recipes[first]
        keys = [key for _pattern, key in recipe.sources]
        if recipe.converter is None:
            return {keys[0]: meta[first]}
        try:
            saved = revert_weight_conversion(self.model, {_spelled_as(t, keys[0], self.model): meta[t]
                                                          for t in recipe.targets})
        except Exception as exc:  # an operation that cannot run on shapes alone
            raise WeightsUnavailable(f"cannot tell which tensors {first} is built from ({first_line(exc)})") from None
        if set(keys) - saved.keys():
            raise WeightsUnavailable(f"{first} is built from tensors save_pretrained would not write "
                                     f"({sorted(set(keys) - saved.keys())[0]})")
        absent = sorted(saved.keys() - set(keys), key=dot_natural_key)
        if absent:
            raise BaseModelError(f"base model checkpoint {self.names_from} has no tensor {absent[0]} "
                                 f"(transformers builds {first} from it)")
        return saved

    def load_into(self, module: nn.Module, path: str, device: torch.device, dtype: torch.dtype,
                  names: list[str] | None = None) -> None:
        """Materialise ``names`` (parameters or buffers; default: every parameter) of
        ``module``, which sits at ``path`` in the model, on ``device``; floating-point tensors
        in ``dtype`` (float32 where transformers keeps them so, see :meth:`dtype_of`)."""
        from safetensors import safe_open

        if names is None:
            names = [name for name, _param in module.named_parameters()]
        local = {f"{path}.{name}" if path else name: name for name in names}
        with ExitStack() as files:
            handles: dict[Path, Any] = {}

            def read(key: str, target: torch.dtype) -> torch.Tensor:
                file = self.files[key]
                if file not in handles:
                    handles[file] = files.enter_context(safe_open(file, framework="pt", device="cpu"))
                tensor = handles[file].get_tensor(key)
                return tensor.to(target) if tensor.is_floating_point() else tensor

            for first in dict.fromkeys(self.built_by[full] for full in local if full in self.built_by):
                built = self.recipes[first].build(partial(read, target=self.dtype_of(first, dtype)), self.model)
                for full, tensor in built.items():
                    if full in local:
                        _replace_tensor(module, local[full], tensor.to(device))

    def dtype_of(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype tensor ``name`` is loaded in when the model computes in ``dtype``: float32
        where transformers keeps it so, else the one the model made it in, as ``from_pretrained``
        casts (a buffer the model makes in float32 stays float32)."""
        parts = f".{name}."
        kept = self.float32_modules.get(dtype, ())
        return torch.float32 if any(f".{module}." in parts for module in kept) else self.made_in[name]


@dataclass
class _Recipe:
    """How ``from_pretrained`` builds ``targets`` (parameter names): ``converter`` (a
    transformers ``WeightConverter``; None: one tensor, at most renamed) applied to
    ``sources``, (source pattern, checkpoint key) in the order transformers collects them."""

    converter: Any
    targets: list[str]
    sources: list[tuple[str, str]] = field(default_factory=list)

    def build(self, read: Callable[[str], torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        if self.converter is None:
            return {self.targets[0]: read(self.sources[0][1])}
        converter = copy.deepcopy(self.converter)  # it collects the tensors it converts
        for pattern, key in self.sources:
            converter.add_tensor(self.targets[0], key, pattern, partial(read, key))
        built = converter.convert(self.targets[0], model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in built.items()}


def _recipes(model: nn.Module, meta: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, _Recipe]:
    """Checkpoint ``keys`` grouped by the parameters they build (``meta``: the model's
    state dict), by the first one's name, as ``convert_and_load_state_dict_in_model``
    groups them (keys the model does not use are left out, as it leaves them)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    prefix = model.base_model_prefix
    recipes: dict[str, _Recipe] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:  # a name the model has is not renamed
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        if target not in meta or (pattern is None and target in recipes):
            continue
        if pattern is None:
            recipes[target] = _Recipe(None, [target], [(key, key)])
        else:
            converter = by_pattern[pattern]
            first = converter.target_patterns[0]
            targets = [name for t in converter.target_patterns if (name := target.replace(first, t)) in meta]
            recipe = recipes.setdefault(target, _Recipe(converter, targets))
            recipe.sources.append((pattern, key))
    return recipes


def _spelled_as(name: str, key: str, model: nn.Module) -> str:
    """Parameter ``name`` with or without the base model's prefix, as checkpoint ``key``
    spells its names (a ``MixtralModel`` read from a ``MixtralForCausalLM`` checkpoint)."""
    prefix = f"{model.base_model_prefix}."
    if prefix == "." or key.startswith(prefix) == name.startswith(prefix):
        return name
    return prefix + name if key.startswith(prefix) else name[len(prefix):]


def _check_shapes(found: _Found, expected: dict[str, torch.Tensor], ignore_mismatched: bool,
                  resizable: Iterable[str] = ()) -> set[str]:
    """Raise :class:`BaseModelError` naming the file and tensor where the checkpoint cannot
    give what a parameter needs (``expected``: checkpoint key -> a tensor of the shape it
    must have): its file lacks the tensor, or holds it in another shape (its kind of dtype:
    :func:`_check_kinds`). A shape that differs where transformers is told to ignore sizes
    is returned for the ``resizable`` keys (a head the adapters replace, given only then:
    initialised instead), else left to transformers: the model loads whole."""
    resized: set[str] = set()
    for key, param in expected.items():
        shape = found.header(key).shape
        if shape != list(param.shape):
            mismatch = f"tensor {key} has shape {shape} where the model's config gives {list(param.shape)}"
            if key in resizable:
                resized.add(key)
            elif ignore_mismatched:
                raise WeightsUnavailable(mismatch)
            else:
                raise BaseModelError(f"base model checkpoint file {found.files[key]}: {mismatch}")
    return resized


@dataclass(frozen=True)
class _Header:
    """A tensor as its safetensors file's header describes it (``dtype``: ``F32``, ``I64`` ...)."""

    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class _Found:
    """A safetensors checkpoint as transformers reads it: ``names_from``, the file that names
    its tensors (``model.safetensors`` or its index); ``files``, the file each tensor is read
    from; ``headers``, each file's tensors, read once for every check."""

    names_from: Path
    files: dict[str, Path]
    headers: dict[Path, dict[str, _Header]]

    def header(self, key: str) -> _Header:
        """Tensor ``key``'s header; an error naming the shard where the index names one the shard
        lacks (``from_pretrained`` would initialise it at random)."""
        file = self.files[key]
        if key not in self.headers[file]:
            raise _not_in(file, key)
        return self.headers[file][key]


def _files(folder: Path) -> _Found | None:
    """The safetensors checkpoint in ``folder``, as transformers reads it; None where there is
    none. A broken index or shard is one line naming it (see :func:`_weight_map`,
    :func:`_headers`)."""
    index = folder / "model.safetensors.index.json"
    # transformers reads model.safetensors where both it and an index are present, and
    # every tensor of the shards an index names (one its weight_map leaves out too)
    if (folder / "model.safetensors").is_file():
        whole = folder / "model.safetensors"
        headers = {whole: _headers(whole)}
        return _Found(whole, dict.fromkeys(headers[whole], whole), headers)
    if not index.is_file():
        return None
    weight_map = {key: folder / name for key, name in _weight_map(index).items()}
    headers = {shard: _headers(shard) for shard in sorted(set(weight_map.values()))}
    files = {key: shard for shard, held in headers.items() for key in held}
    files.update(weight_map)  # a tensor missing from the shard its index names is refused by _Found.header
    return _Found(index, files, headers)


def check_files(cls: type[nn.Module], name_or_path: str, config: PretrainedConfig, dtype: torch.dtype,
                trust_remote_code: bool = False) -> None:
    """Before a whole load (``from_pretrained``), the checks a streamed load makes of the
    checkpoint's files, so that every placement takes or refuses the same checkpoint: a
    malformed index or an unreadable shard (transformers: a KeyError, TypeError or
    SafetensorError traceback), and a tensor of another kind of dtype than its parameter's
    (transformers casts it, see :func:`_check_kinds`), are one line naming the file. Left to
    transformers: a checkpoint that is not local safetensors (a Hub id not downloaded yet,
    ``.bin`` files), and the kinds of a quantized one's tensors (its quantizer's integers),
    of remote code's (it never streams) and of those this transformers' internals hide."""
    folder = local_folder(name_or_path)
    found = _files(folder) if folder is not None else None
    if found is None or trust_remote_code or _quantized(config):
        return
    model = _skeleton(cls, config, dtype)
    try:
        _checked_recipes(found, model)
    except WeightsUnavailable:
        return


def _checked_recipes(found: _Found, model: nn.Module) -> dict[str, _Recipe]:
    """The recipes (see :func:`_recipes`) that build ``model``'s parameters from checkpoint
    ``found``, each tensor's kind checked (:func:`_check_kinds`): the checks every placement
    makes. WeightsUnavailable where this transformers' internals hide them."""
    meta = model.state_dict()  # every name the model loads: tied parameters and persistent buffers too
    with _transformers_internals():
        recipes = _recipes(model, meta, found.files)
    _check_kinds(found, recipes, meta)
    return recipes


def _check_kinds(found: _Found, recipes: dict[str, _Recipe], meta: dict[str, torch.Tensor]) -> None:
    """Raise :class:`BaseModelError` naming the file and tensor where the checkpoint stores a
    tensor in another kind of dtype than the parameter it builds (integers or booleans for a
    floating-point weight, a float for an integer buffer), or lacks one its index names.
    ``from_pretrained`` casts the one and initialises the other at random: a mask or packed
    integers were read as weights, and the merge exited 0 meaning nothing."""
    for first, recipe in recipes.items():
        param = meta[first]
        for _pattern, key in recipe.sources:
            dtype = found.header(key).dtype  # a tensor the index names and its shard lacks: refused here
            if _floating(dtype) != param.is_floating_point():
                raise BaseModelError(f"base model checkpoint file {found.files[key]}: tensor {key} is {dtype} "
                                     f"where the model has a {param.dtype} parameter")


def _not_in(file: Path, key: str) -> BaseModelError:
    return BaseModelError(f"base model checkpoint file {file} has no tensor {key} (its index names it)")


def _headers(file: Path) -> dict[str, _Header]:
    """The tensors safetensors ``file`` holds; one line naming it where it is missing or
    cannot be read (a truncated copy was a SafetensorError traceback)."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise BaseModelError(f"base model checkpoint file {file} is missing (its index names it)")
    try:
        with safe_open(file, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: _Header(piece.get_dtype(), piece.get_shape()) for key, piece in slices.items()}
    except SafetensorError as exc:
        raise BaseModelError(f"base model checkpoint file {file} cannot be read: {first_line(exc)}") from None


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name; one line naming the index where it has
    none (transformers fails on such an index with a KeyError or TypeError traceback)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError):  # not JSON, or not an object
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise BaseModelError(f"base model checkpoint index {index} is malformed: it needs a \"weight_map\" "
                             f"of tensor names to shard file names")
    return weight_map


def _filled_by_ties(ties: dict[str, str], missing: set[str]) -> set[str]:
    """The ``missing`` parameters ``tie_weights(missing_keys=...)`` ties to a stored one
    (``ties``: target -> source): each of a group tied to one source where any of the
    group is stored (a head stored as ``lm_head.weight`` only gives the embedding too)."""
    groups: dict[str, set[str]] = {}
    for target, source in ties.items():
        groups.setdefault(source, {source}).add(target)
    return {name for group in groups.values() if group - missing for name in group & missing}


def _floating(dtype: str) -> bool:
    """Whether a safetensors header dtype (``F32``, ``BF16``, ``F8_E4M3``, ``I64`` ...) is a float."""
    return dtype.startswith(("F", "BF"))


def local_folder(name_or_path: str) -> Path | None:
    """The folder holding the checkpoint: a local path as is, a Hub id from the local cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception:  # not cached: let from_pretrained download it (whole-model load)
        return None


def load_streamed(cls, name_or_path: str, config, dtype: torch.dtype, device: torch.device,
                  block_paths, ignore_mismatched: bool = False,
                  replaced: Iterable[str] = ()) -> tuple[nn.Module, Streamed]:
    """The model with real weights outside its blocks and empty (meta) blocks.

    ``block_paths(model)`` names the block stacks; parameters under them stay on the
    meta device until :class:`Streamed` loads them block by block. ``ignore_mismatched``:
    what ``from_pretrained`` is told (see :func:`_check_shapes`); ``replaced``: the
    parameters the adapters' saved modules replace (see :class:`Checkpoint`; those in the
    blocks are not: a block weight the checkpoint cannot give never streams).
    """
    folder = local_folder(name_or_path)
    if folder is None:
        raise WeightsUnavailable(f"{name_or_path} is not a local folder or cached snapshot")
    if _quantized(config):
        raise WeightsUnavailable("a quantized checkpoint (quantization_config)")
    found = _files(folder)
    if found is None:
        raise WeightsUnavailable(f"no safetensors checkpoint in {folder}")
    # Before any weight is read, and before the skeleton is built: block weights read and
    # dropped block after block fragment the heap otherwise, and the peak grows with depth.
    # Building the skeleton frees large blocks, which raise glibc's threshold; fixed after
    # it, block weights still came from the heap's free chunks (benchmarks.scale: +77% of
    # the added weights, as with glibc's defaults; +21% fixed here). A model that turns
    # out not to stream (WeightsUnavailable: a check, the tie) gets glibc's heap back for
    # its whole load (resident passes run faster so).
    malloc.keep_large_blocks_in_mmap()
    try:
        return _streamed(cls, found, config, dtype, device, block_paths, ignore_mismatched, replaced)
    except WeightsUnavailable:
        malloc.serve_large_blocks_from_heap()
        raise


def _streamed(cls, found: _Found, config, dtype: torch.dtype, device: torch.device, block_paths,
              ignore_mismatched: bool, replaced: Iterable[str]) -> tuple[nn.Module, Streamed]:
    """:func:`load_streamed`'s work, once glibc's threshold is fixed: WeightsUnavailable where
    the model must load whole, ``checked`` (:func:`_stream_into` refuses only after the checks)."""
    model = _skeleton(cls, config, dtype)
    try:
        return model, _stream_into(model, found, device, dtype, block_paths, ignore_mismatched, replaced)
    except WeightsUnavailable as exc:
        exc.checked = True
        raise


def _stream_into(model: nn.Module, found: _Found, device: torch.device, dtype: torch.dtype, block_paths,
                 ignore_mismatched: bool, replaced: Iterable[str]) -> Streamed:
    """``model`` (a fresh skeleton) given the weights outside its blocks; its blocks' streamed.
    :func:`check_files`' checks come first, before anything here can refuse the stream."""
    recipes = _checked_recipes(found, model)
    stacks = tuple(f"{p}." for p in block_paths(model))
    if not stacks:
        raise WeightsUnavailable("no block stacks to stream")
    checkpoint = Checkpoint(found, model, recipes, ignore_mismatched,
                            [name for name in replaced if not name.startswith(stacks)])
    in_blocks = [name for name in checkpoint.missing if name.startswith(stacks)]
    if in_blocks:  # tied below, its block's load would untie it again
        raise WeightsUnavailable(f"the checkpoint has no tensor named {in_blocks[0]} (a block's, tied to another)")
    # Block parameters are read with their block; buffers (small) are all read now
    buffers = dict(model.named_buffers())
    now = [name for name in checkpoint.stored if name in buffers or not name.startswith(stacks)]
    checkpoint.load_into(model, "", device, dtype, names=now)
    _initialise(model, checkpoint.initialised, device, partial(checkpoint.dtype_of, dtype=dtype))
    # Ties as from_pretrained ties: a parameter the checkpoint lacks to its stored partner;
    # two stored with different values (a config that says tied, a checkpoint that is not)
    # stay apart
    with _transformers_internals():
        model.tie_weights(missing_keys=set(checkpoint.missing), recompute_mapping=False)
    for name, buffer in model.named_buffers():
        if buffer.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = buffer.to(device)
    model.eval()
    return Streamed(checkpoint, device, dtype)


def _quantized(config: PretrainedConfig) -> bool:
    """Whether the config names a quantizer (its scales and packed weights are transformers'
    to read; it reads the config so, and refuses an empty one)."""
    return (getattr(config, "quantization_config", None) or getattr(
        config.get_text_config(decoder=True), "quantization_config", None)) is not None


def _initialise(model: nn.Module, names: list[str], device: torch.device,
                dtype_of: Callable[[str], torch.dtype]) -> None:
    """Give parameters ``names``, which the checkpoint does not give, storage on ``device`` and
    initialise them as ``from_pretrained`` initialises its missing keys: the model's own
    ``_init_weights`` on the modules that hold them, every other tensor kept as loaded."""
    if not names:
        return
    for tensor in (*model.parameters(), *model.buffers()):
        tensor._is_hf_initialized = True
    for name in names:
        _replace_tensor(model, name, torch.empty(model.get_parameter(name).shape, dtype=dtype_of(name), device=device))
        model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = False
    model.initialize_weights()


def _skeleton(cls, config, dtype: torch.dtype) -> nn.Module:
    """The model's modules with meta parameters, untied (:func:`load_streamed` ties them once
    it knows what the checkpoint holds), and buffers as ``from_pretrained`` leaves them when
    it loads in ``dtype``: created in ``dtype``, then computed again by the model's own
    initialisation (in the process's default dtype) into them. Built in the checkpoint's
    dtype instead, Gemma's ``embed_scale`` stayed bfloat16 and GPT-J's rotary table was
    computed in bfloat16, so merges differed between placements."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        model = build(config, dtype=dtype)
    for param in model.parameters():
        param._is_hf_initialized = True  # every weight comes from the checkpoint: only buffers are computed
    model.initialize_weights()
    return model
