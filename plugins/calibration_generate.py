"""Built-in data-free calibration source ``generate``: inputs made from the adapter's own
model when no real data exists. Asked only when the configured order lists it, and
marked ``generated`` in the merge report: merging on made-up inputs is a fallback.

- Generative models (causal LM, seq2seq): text sampled from base + that adapter
  (PEFT applies the adapter), starting from the tokenizer's BOS (or a short random
  prompt for seq2seq, whose decoder output becomes the target), on the options'
  device in their dtype (``merge``'s ``--device`` and ``--dtype``). The base is loaded
  once per run and kept until ``release()``; each adapter replaces the one before it.
  A base larger than the memory free there (or than ``max_memory_mb``) is placed by
  accelerate: on the device, then in CPU memory, the rest read from disk as it is
  computed on (slow, but a 70B base runs on one GPU or the CPU); the offload folder is
  a temporary one in the cache folder, deleted on ``release()``, and the base is loaded
  again for each adapter (PEFT cannot swap adapters on such a model;
  :mod:`iteris_daemon.plugins.generate_placement`).
- Encoders: sequences of random whole-word vocabulary tokens (an encoder cannot
  write text); they still exercise every adapted layer with in-vocabulary inputs.

Settings (``CalibrationOptions.settings["generate"]``): ``samples`` (default: the
merge's samples per task), ``max_new_tokens`` (32; capped at what a learned position
table holds), ``min_new_tokens`` (None: no minimum), ``seed`` (0), ``max_memory_mb`` (None:
what is free; else MiB per device, ``{"cuda:0": 70000, "cpu": 100000}``, past which weights
wait in CPU memory, then on disk). A sample that
generated no text (EOS at once) is dropped; the set's ``source`` names the settings used.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, PositiveInt, ValidationInfo, field_validator

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CalibrationOptions, CalibrationSet, CalibrationSettings, Sample, source_settings
from iteris_daemon.devices import check_device
from iteris_daemon.errors import CalibrationError, MergeCancelled
from iteris_daemon.paths import cache_dir
from iteris_daemon.plugins.generate_placement import (OffloadFolder, accelerate_key, apply_on_placed, main_device,
                                                      placement_of, sweep)

log = logging.getLogger(__name__)
BATCH = 8  # texts generated at once


class GenerateSettings(CalibrationSettings):
    model_config = ConfigDict(extra="forbid", strict=True)

    samples: int | None = Field(None, ge=1, le=100_000, description="samples per adapter (None: the merge's "
                                                                     "samples per task)")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per sample")
    min_new_tokens: int | None = Field(None, ge=1, description="tokens generated before EOS may end a sample (None: "
                                                               "no minimum), for a model that ends them at once")
    seed: int = Field(0, description="seed of the sampling, for the same inputs run after run")
    max_memory_mb: dict[str, PositiveInt] | None = Field(
        None, description='MiB the base model may take per device, e.g. {"cuda:0": 70000, "cpu": 100000} (None: what is '
                          'free): a base larger than the device is placed by accelerate, the rest in CPU memory, then '
                          'read from disk')

    @field_validator("max_memory_mb")
    @classmethod
    def _devices(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name in value or {}:
            check_device(name)
        return value

    @field_validator("min_new_tokens")
    @classmethod
    def _within_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        most = info.data.get("max_new_tokens")
        if value is not None and most is not None and value > most:
            raise ValueError(f"{value} is more than max_new_tokens ({most})")
        return value


class Generate:
    name = "generate"
    description = "data-free fallback: text sampled from base + the adapter (random vocabulary for encoders)"
    Settings = GenerateSettings
    runs_in_worker = True  # it loads the model (torch, transformers): the daemon calls it in a worker

    def __init__(self) -> None:
        # The run's base model (a PeftModel once an adapter was applied), what it was loaded
        # as, and the name of the one adapter applied to it: loading a 70B base for each of
        # 20 adapters took minutes each. ``_folder``: the offload folder of a base placed by
        # accelerate (None: loaded whole on the device).
        self._key: tuple | None = None
        self._model: Any = None
        self._applied: str | None = None
        self._folder: OffloadFolder | None = None
        self._device: Any = None  # where the kept model computes and takes its inputs
        self._names = itertools.count()

    def release(self) -> None:
        """Drop the base model kept between this run's ``load`` calls, and its offload folder."""
        self._key = self._model = self._applied = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        if not options.base_model:
            raise CalibrationError(adapter.path, "the generate source needs the base model")
        settings = source_settings(self, options.settings.get(self.name, {}))
        samples = settings.samples or options.samples
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(options.base_model, trust_remote_code=options.trust_remote_code)
        if adapter.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            texts = [Sample(t) for t in _random_words(tokenizer, samples, settings.seed)]
            return CalibrationSet(tuple(texts), generated=True, source=f"generated by {self.name} from "
                                  f"{adapter.name} (random vocabulary words, seed {settings.seed}, samples {samples})")
        model = self._with_adapter(adapter, options, settings)
        lengths = {"max_new_tokens": _capped(model, adapter, settings.max_new_tokens)}
        if settings.min_new_tokens is not None:
            lengths["min_new_tokens"] = min(settings.min_new_tokens, lengths["max_new_tokens"])
        # Minutes per batch on a large base: the log says what is under way, and how long it took.
        log.info("generate: sampling %d texts from adapter %s (up to %d new tokens each, batches of %d)", samples,
                 adapter.name, lengths["max_new_tokens"], BATCH)
        began = time.monotonic()
        texts = _kept(_sample(model, self._device, adapter, tokenizer, samples, lengths, settings.seed,
                              options.should_stop), adapter, lengths)
        log.info("generate: adapter %s: %d texts in %.1f s", adapter.name, len(texts), time.monotonic() - began)
        used = ", ".join([f"seed {settings.seed}", *(f"{key} {value}" for key, value in lengths.items()),
                          f"samples {samples}", str(model.dtype).removeprefix("torch.")])
        return CalibrationSet(tuple(texts), source=f"generated by {self.name} from {adapter.name} ({used})",
                              generated=True)

    def _with_adapter(self, adapter, options: CalibrationOptions, settings: GenerateSettings) -> Any:
        """The base model of ``options`` with ``adapter`` applied and no other, on
        ``options.device`` in ``options.dtype``, as ``options.trust_remote_code`` allows: the
        kept one where it was loaded alike, with the adapter before it deleted (PEFT's own
        multi-adapter calls: its ``unload`` would leave a saved module's copy, lm_head say,
        in the base). Seeded after the base is loaded (transformers draws nothing loading a
        whole checkpoint) and before PEFT makes the adapter's layers (which draws), as when
        each adapter loaded the base: the samples are the ones that gave. A base placed by
        accelerate is loaded again for each adapter: its offload hooks hold the weights of
        the adapter applied, which PEFT's swap does not reach."""
        from transformers import AutoConfig

        from iteris_daemon.model import torch_device
        from iteris_daemon.model_class import model_class_for

        device = torch_device(options.device)  # one line for a device this machine lacks
        trust = options.trust_remote_code
        config = AutoConfig.from_pretrained(options.base_model, trust_remote_code=trust)
        cls = model_class_for([adapter], config)
        budget = tuple(sorted((settings.max_memory_mb or {}).items()))
        key = (options.base_model, options.dtype, device, trust, cls, budget)
        if key != self._key or (self._applied is not None and self._folder is not None):
            self._load(key, config, options.cache_dir)
        elif self._applied is not None:
            try:
                return self._apply(adapter, device, settings.seed)
            except (ValueError, TypeError):  # PEFT keeps a deleted adapter's wrappers and refuses to wrap one
                self._load(key, config, options.cache_dir)  # in another (a saved lm_head, then a LoRA on it): this
        return self._apply(adapter, device, settings.seed)  # adapter on a fresh base

    def _load(self, key: tuple, config, cache: Path | None) -> None:
        """The base as ``key`` says: whole, then moved to the device, where it fits the memory
        there; else placed by accelerate (device, CPU memory, then an offload folder in the
        cache folder for what fits neither). One line says which."""
        import torch

        base_model, dtype, device, trust, cls, budget = key
        self.release()
        dtype = getattr(torch, dtype) if dtype else "auto"
        placement = placement_of(cls, config, dtype, device, dict(budget), trust)
        offload = (cache or cache_dir()) / "offload"
        sweep(offload)  # what a run killed mid-sampling left, whether this base is placed or not
        if set(placement.values()) == {accelerate_key(device)}:
            log.info("generate: base model %s loaded whole, on %s", base_model, device)
            self._model = cls.from_pretrained(base_model, dtype=dtype, trust_remote_code=trust)
        else:
            self._folder = OffloadFolder(offload)
            where = {place: sum(1 for p in placement.values() if p == place) for place in placement.values()}
            log.info("generate: base model %s does not fit %s whole (budget %s): placed by accelerate, modules %s, "
                     "offload folder %s", base_model, device, dict(budget) or "the free memory",
                     ", ".join(f"{count} on {place}" for place, count in where.items()), self._folder.path)
            if set(where) == {"disk"}:
                log.warning("generate: no part of base model %s fits the memory budget (%s): every batch reads all "
                            "its weights from disk, which is slow; raise generate.max_memory_mb or free memory",
                            base_model, dict(budget) or "the free memory")
            self._model = cls.from_pretrained(base_model, dtype=dtype, trust_remote_code=trust, device_map=placement,
                                              offload_folder=str(self._folder.path))
        self._key, self._device = key, device if self._folder is None else main_device(placement, device)

    def _apply(self, adapter, device: Any, seed: int) -> Any:
        """``adapter`` on the kept model in place of the one before it; the model is dropped
        where this fails half-way."""
        import torch
        from peft import PeftModel

        name = f"adapter{next(self._names)}"
        torch.manual_seed(seed)
        try:
            if self._folder is not None:
                self._model = apply_on_placed(self._model, str(adapter.path), name, self._device, str(self._folder.path))
            elif self._applied is None:
                self._model = PeftModel.from_pretrained(self._model, str(adapter.path), adapter_name=name).to(device)
            else:
                self._model.load_adapter(str(adapter.path), adapter_name=name)
                self._model.set_adapter(name)
                self._model.delete_adapter(self._applied)
        except BaseException:
            self.release()
            raise
        self._applied = name
        self._model.eval()
        return self._model


def _random_words(tokenizer, samples: int, seed: int, length: tuple[int, int] = (6, 24)) -> list[str]:
    vocabulary = sorted(t for t in tokenizer.get_vocab() if t.isalpha() and t.isascii() and len(t) > 1)
    if not vocabulary:
        raise CalibrationError(str(tokenizer.name_or_path), "the tokenizer has no whole-word tokens to sample")
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocabulary, k=rng.randint(*length))) for _ in range(samples)]


def _capped(model, adapter, max_new_tokens: int) -> int:
    """``max_new_tokens``, at most what the model's learned position table holds after the
    one token generation starts from (GPT-2 and OPT failed past it with an IndexError).
    Rotary and relative positions have no table: any length fits them."""
    limit = _learned_positions(model)
    if limit is None or max_new_tokens < limit:
        return max_new_tokens
    log.warning("generate: max_new_tokens %d capped at %d for adapter %s: the base model's learned position table "
                "holds %d positions (max_position_embeddings), one of them the token generation starts from",
                max_new_tokens, limit - 1, adapter.name, limit)
    return limit - 1


def _learned_positions(model) -> int | None:
    """The config's ``max_position_embeddings`` where the model holds a learned position
    table (an embedding of that many rows beside the tokens'; OPT and BART keep 2 more),
    else None."""
    from torch import nn

    from iteris_daemon.model import input_rows

    config = model.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tokens = input_rows(model)
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings != tokens]
    return limit if any(0 <= rows - limit <= 2 for rows in tables) else None


def _kept(samples: list[Sample | None], adapter, lengths: dict[str, int]) -> list[Sample]:
    """The samples that hold generated text: one the model ended at once (EOS) is not
    calibration (it was the EOS's own text, "</s>", every sample alike)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise CalibrationError(adapter.path, f"every sample generated from adapter {adapter.name} ended at once (EOS) "
                                             "and holds no text; set generate.min_new_tokens (at most "
                                             f"{lengths['max_new_tokens']}) to keep EOS away until then")
    if len(kept) < len(samples):
        log.warning("generate: %d of %d samples generated from adapter %s hold no text (EOS at once); dropped",
                    len(samples) - len(kept), len(samples), adapter.name)
    return kept


def _sample(model, device, adapter, tokenizer, samples: int, lengths: dict[str, int], seed: int,
            should_stop: Callable[[], bool]) -> list[Sample | None]:
    """Text sampled from ``model``, the base with ``adapter`` applied, its inputs on ``device``
    (where it computes, also when accelerate placed it: its first weight may be on disk;
    ``lengths``: generate()'s ``max_new_tokens``, and ``min_new_tokens`` where set); None
    for a sample that generated no text. A stop asked for ends it before the next batch."""
    import torch

    from iteris_daemon.model import input_rows, pad_within

    seq2seq = adapter.task_type == "SEQ_2_SEQ_LM"
    prompts = _random_words(tokenizer, samples, seed, (3, 8)) if seq2seq else [""] * samples
    pad_within(tokenizer, model, tokenizer.name_or_path)  # generate() pads with it: one the model holds
    out = []
    with torch.no_grad():
        for start in range(0, samples, BATCH):
            if should_stop():  # a batch on a placed 70B base takes minutes: the worker's grace would end first
                raise MergeCancelled(f"cancelled while generating calibration samples for {adapter.name}")
            count = len(prompts[start:start + BATCH])
            if seq2seq:
                batch = tokenizer(prompts[start:start + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
                # Only what every generating model takes: a BERT-style tokenizer on a Llama also
                # gives token_type_ids, which generate() refuses for a model without them.
                batch = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
            elif tokenizer.bos_token_id is not None:  # the BOS alone, as the model's texts begin (the
                # tokenizer, given the BOS's text, added its own: two BOS, sampling off its texts)
                batch = {"input_ids": torch.full((count, 1), tokenizer.bos_token_id)}
            else:  # no BOS token: start from a random token, one the model's embedding holds
                held = min(len(tokenizer), input_rows(model) or len(tokenizer))
                batch = {"input_ids": torch.randint(0, held, (count, 1))}
            batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
            batch = {key: value.to(device) for key, value in batch.items()}
            generated = model.generate(**batch, do_sample=True, top_k=50, **lengths,
                                       pad_token_id=tokenizer.pad_token_id)
            if not seq2seq:
                generated = generated[:, batch["input_ids"].shape[1]:]
            for prompt, ids in zip(prompts[start:start + BATCH], generated):
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                out.append(None if not text else Sample(prompt, text) if seq2seq else Sample(text))
    return out


@hookimpl
def register_calibration_sources(register) -> None:
    register(Generate())
