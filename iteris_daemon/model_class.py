"""Which transformers class to instantiate for a set of LoRA adapters.

An adapter's module paths are relative to the model class it was trained on:
``model.layers.0.self_attn.q_proj`` on ``LlamaForCausalLM``, ``layers.0.self_attn.q_proj``
on ``LlamaModel``. Loading another class makes every path miss, so the class
must be the one PEFT wrapped. PEFT records it in one of two ways: a ``task_type``
(an auto class per task), or, for adapters made without one, ``auto_mapping``
(``{"base_model_class": "LlamaForCausalLM", "parent_library": "transformers..."}``).

Only names exported by the top-level ``transformers`` package are ever used:
``parent_library`` is never imported, because an adapter must not choose what
code runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import IncompatibleAdaptersError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .lora import LoraAdapter

# PEFT task_type -> the transformers auto class PEFT's task wrappers expect.
TASK_CLASSES = {
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def task_class(task_type: str) -> type:
    """The auto class for a PEFT ``task_type``; an unknown one cannot be merged."""
    import transformers

    if task_type not in TASK_CLASSES:  # PEFT's names are case-sensitive: "causal_lm" is none of them
        raise IncompatibleAdaptersError(f"unsupported PEFT task_type {task_type!r} (PEFT's are "
                                        f"{', '.join(sorted(TASK_CLASSES))})")
    return getattr(transformers, TASK_CLASSES[task_type])


def exported_model_class(name: Any) -> type | None:
    """``transformers.<name>`` if that is a model class (concrete or auto), else None.

    Looked up on the top-level package only, so the name cannot reach other code.
    """
    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        return None
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):  # not exported, or a backend this install lacks
        return None
    if isinstance(cls, type) and issubclass(cls, (PreTrainedModel, _BaseAutoModelClass)):
        return cls
    return None


def _fits_config(cls: type, config: PretrainedConfig) -> bool:
    """A concrete class built from another model type's config misbehaves silently."""
    config_class = getattr(cls, "config_class", None)
    return config_class is None or isinstance(config, config_class)


def instantiate(cls: type, config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """``cls`` built from ``config`` (no weights): auto classes have ``from_config``,
    concrete ones ``_from_config``."""
    if hasattr(cls, "from_config"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls._from_config(config)


def _adapter_class(name: str, config: Mapping[str, Any], base_config: PretrainedConfig) -> tuple[str, type] | None:
    """What one adapter asks for: (the field that says so, the class), or None."""
    task_type = config.get("task_type")
    if task_type is not None:
        try:
            return f"task_type={task_type}", task_class(task_type)
        except IncompatibleAdaptersError as exc:
            raise IncompatibleAdaptersError(f"adapter {name}: {exc}") from None
    mapping = config.get("auto_mapping")
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise IncompatibleAdaptersError(f"adapter {name}: auto_mapping must be an object, got {mapping!r}")
    wanted = mapping.get("base_model_class")
    cls = exported_model_class(wanted)
    if cls is None:
        raise IncompatibleAdaptersError(
            f"adapter {name}: auto_mapping.base_model_class {wanted!r} is not a model class of the transformers package"
        )
    if not _fits_config(cls, base_config):
        raise IncompatibleAdaptersError(
            f"adapter {name}: auto_mapping.base_model_class {wanted} is for "
            f"{getattr(cls.config_class, 'model_type', '?')} models, the base model is {base_config.model_type}"
        )
    return f"auto_mapping.base_model_class={wanted}", cls


def _skeleton(cls: type, config: PretrainedConfig) -> torch.nn.Module | None:
    """``cls`` built from ``config`` on the meta device (no memory), or None if it cannot be."""
    try:
        with torch.device("meta"):
            return instantiate(cls, config)
    except Exception:  # noqa: BLE001 - a class that cannot be built from this config is not the one
        return None


def _recorded_class(base_config: PretrainedConfig, module_paths: Collection[str]) -> type | None:
    """The class the base model was saved as, if the adapters' module paths exist in it."""
    found = _recorded_skeleton(base_config, module_paths)
    return found[0] if found is not None else None


def _recorded_skeleton(base_config: PretrainedConfig,
                       module_paths: Collection[str]) -> tuple[type, torch.nn.Module] | None:
    """:func:`_recorded_class` and the skeleton that showed it (one meta build, not two)."""
    names = getattr(base_config, "architectures", None) or []
    cls = exported_model_class(names[0]) if names else None
    if cls is None or not module_paths or not _fits_config(cls, base_config):
        return None
    skeleton = _skeleton(cls, base_config)
    if skeleton is None:
        return None
    present = {path for path, _ in skeleton.named_modules()}
    return (cls, skeleton) if set(module_paths) <= present else None


def _block_parameters(model: torch.nn.Module) -> set[str]:
    """The names of ``model``'s parameters inside its module lists (its blocks)."""
    lists = [path for path, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    return {name for name, _ in model.named_parameters() if any(name.startswith(f"{path}.") for path in lists)}


def _builds_blocks_beyond(cls: type, saved: torch.nn.Module, config: PretrainedConfig) -> bool:
    """Whether ``cls`` has blocks that ``saved``, a skeleton of the class the checkpoint was
    saved as, has not: the checkpoint does not hold them (a T5Model's decoder, for a
    T5EncoderModel's checkpoint), and the load is refused (weights drawn at random). A head
    or a pooler the recorded class lacks does not count: a classifier's comes from the adapters."""
    built = _skeleton(cls, config)
    return built is not None and bool(_block_parameters(built) - _block_parameters(saved))


def choose_model_class(
    adapters: Mapping[str, Mapping[str, Any]],
    base_config: PretrainedConfig,
    module_paths: Collection[str] = (),
) -> type:
    """The transformers class to load the base model as, for ``adapters`` (name -> adapter config).

    In order: the adapters' PEFT ``task_type`` (its auto class, unless that class does not
    know this model, or builds blocks the class the checkpoint was saved as has not, as
    ``AutoModel`` builds a T5Model, decoder included, for FEATURE_EXTRACTION on a
    T5EncoderModel: then the recorded class below, where the adapted modules exist); else their
    ``auto_mapping.base_model_class`` (a class transformers exports); else
    ``base_config.architectures[0]`` when ``module_paths`` (the adapted modules)
    all exist in it; else ``AutoModel``. Adapters asking for different classes are
    refused: one loaded model must serve every one of them.
    """
    from transformers import AutoModel

    task_types = {config.get("task_type") for config in adapters.values()}
    if len(task_types) > 1:
        listing = ", ".join(f"{name}: {config.get('task_type')}" for name, config in adapters.items())
        raise IncompatibleAdaptersError(f"adapters have different task types ({listing})")
    wishes = {name: _adapter_class(name, config, base_config) for name, config in adapters.items()}
    classes = {wish[1] for wish in wishes.values() if wish is not None}
    if len(classes) > 1:
        listing = ", ".join(f"{name}: {wish[0] if wish else 'no class recorded'}" for name, wish in wishes.items())
        raise IncompatibleAdaptersError(f"adapters were made on different model classes ({listing})")
    if not classes:
        return _recorded_class(base_config, module_paths) or AutoModel
    cls = classes.pop()
    if task_types == {None}:  # auto_mapping: the class the adapters were made on
        return cls
    # A task_type whose auto class does not know this model: a vision-language model's LoRA
    # saved with task_type CAUSAL_LM (as TRL's recipes save them), which PEFT loads on the
    # model's own class.
    if not _knows(cls, base_config):
        return _recorded_class(base_config, module_paths) or cls
    recorded = _recorded_skeleton(base_config, module_paths)
    return recorded[0] if recorded is not None and _builds_blocks_beyond(cls, recorded[1], base_config) else cls


def _knows(cls: type, config: PretrainedConfig) -> bool:
    """Whether ``cls`` builds a model of ``config``'s type (an auto class maps some types only)."""
    mapping = getattr(cls, "_model_mapping", None)
    return mapping is None or type(config) in mapping


def model_class_for(adapters: Sequence[LoraAdapter], base_config: PretrainedConfig) -> type:
    """:func:`choose_model_class` for loaded adapters (their LoRA and saved modules)."""
    paths = {path for a in adapters for path in a.modules}
    paths |= {key.rsplit(".", 1)[0] for a in adapters for key in a.modules_to_save if "." in key}
    return choose_model_class({a.name: a.config for a in adapters}, base_config, paths)


def merged_auto_mapping(configs: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """The ``auto_mapping`` a merge of adapters without a task_type should record, so
    ``AutoPeftModel`` can load it: the inputs' class, with its real transformers module
    (the inputs' ``parent_library`` is not passed on: it is code an adapter named)."""
    if any(config.get("task_type") is not None for config in configs):
        return None
    for config in configs:
        mapping = config.get("auto_mapping")
        cls = exported_model_class(mapping.get("base_model_class")) if isinstance(mapping, Mapping) else None
        if cls is not None:
            return {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return None
