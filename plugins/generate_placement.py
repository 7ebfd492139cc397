"""A base model larger than its memory budget, for the ``generate`` calibration source:
accelerate's placement of it (device, CPU memory, disk), a LoRA adapter applied on the
placed model, and the offload folder its disk part reads from.

Not PEFT's own path for an offloaded model: PEFT 0.21 rewrites every checkpoint shard that
holds an offloaded weight, to a path it makes relative to the working directory (under
systemd's ``/``, the checkpoint itself)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any

from iteris_daemon.errors import CalibrationError
from iteris_daemon.paths import private_dir

log = logging.getLogger(__name__)


class OffloadFolder:
    """A folder for the weights accelerate keeps on disk, in ``root``, held under an flock
    while in use: a run killed mid-sampling (a worker past its grace, the OOM killer) left its
    folder, tens of GB for a MoE whose experts transformers writes there; each load of a base
    sweeps those no process holds. Made under a name the sweep skips and renamed once locked, so no
    sweep takes one that is being made; its lock is deleted last, so one whose deletion was
    cut short is known by its missing lock and swept too (:func:`sweep`)."""

    PREFIX, LOCK = "generate-offload-", ".lock"

    def __init__(self, root: Path) -> None:
        root = private_dir(root)
        made = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        self._lock = None
        try:
            self._lock = os.open(made / self.LOCK, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self.path = root / f"{self.PREFIX}{made.name.removeprefix('.new-')}"
            made.rename(self.path)
        except OSError as exc:
            if self._lock is not None:
                os.close(self._lock)
            _delete(made)
            raise CalibrationError(root, f"cannot hold an offload folder there ({exc.strerror}; a filesystem without "
                                         "flock, such as NFS without lockd): set the daemon's cache_dir, or "
                                         "$XDG_CACHE_HOME for merge, to a local disk") from None

    def cleanup(self) -> None:
        _delete(self.path)
        os.close(self._lock)


def sweep(root: Path) -> None:
    """Delete the offload folders in ``root`` that no process holds: those of runs killed
    mid-sampling (a stop past the worker's grace, the OOM killer), tens of GB each for a MoE."""
    for folder in root.glob(f"{OffloadFolder.PREFIX}*") if root.is_dir() else ():
        _remove_unheld(folder)


def _remove_unheld(folder: Path) -> None:
    """Delete the offload folder ``folder`` unless a process holds its lock."""
    try:
        fd = os.open(folder / OffloadFolder.LOCK, os.O_RDWR)
    except FileNotFoundError:  # its deletion was cut short (the lock goes last): nobody holds it
        _delete(folder)
        return
    except OSError:  # unreadable: left alone
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # in use (or no locks here: left alone)
        return
    else:
        log.info("generate: deleting the offload folder %s, which a run killed mid-sampling left", folder)
        _delete(folder)
    finally:
        os.close(fd)


def _delete(folder: Path) -> None:
    """Delete an offload folder, its lock last."""
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name != OffloadFolder.LOCK:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    (folder / OffloadFolder.LOCK).unlink(missing_ok=True)
    with suppress(OSError):
        folder.rmdir()


def main_device(placement: dict[str, int | str], device):
    """Where a placed base computes and takes its inputs: ``device``, or the CPU where accelerate
    put none of it there (nothing fits the device's budget; accelerate then adds no hooks and
    leaves the model on the CPU)."""
    import torch

    return device if accelerate_key(device) in set(placement.values()) else torch.device("cpu")


def accelerate_key(device) -> int | str:
    """``device`` as accelerate's ``device_map`` and ``max_memory`` name it: a CUDA index, or "cpu"."""
    import torch

    return "cpu" if device.type == "cpu" else device.index if device.index is not None else torch.cuda.current_device()


def placement_of(cls, config, dtype, device, budget: dict[str, int], trust: bool) -> dict[str, int | str]:
    """accelerate's device map of the base on ``device``, CPU memory and disk, within
    ``budget`` (MiB per device name; a device it leaves out: the memory free there), worked
    out on the model's skeleton (no weights read)."""
    import torch
    from accelerate.utils import get_max_memory, infer_auto_device_map

    from iteris_daemon.model_class import instantiate

    own = (accelerate_key(device), "cpu")  # accelerate's figures: the GPUs' free memory, the RAM available
    free = {key: value for key, value in get_max_memory().items() if key in own}
    for name, mib in budget.items():
        place = torch.device(name)
        if place.type == "cuda" and not torch.cuda.is_available():
            continue  # a device this machine lacks, as for the daemon's workers on the CPU: no budget to set
        key = accelerate_key(place)
        if key in free:
            free[key] = mib * 2**20
    with torch.device("meta"):
        skeleton = instantiate(cls, config, trust)
    if dtype != "auto":  # sized as it loads: a bfloat16 checkpoint loaded in float32 takes twice its files' size
        skeleton.to(dtype)
    sized = getattr(config, "dtype", None) if dtype == "auto" else dtype
    return infer_auto_device_map(skeleton, max_memory=free, dtype=sized,
                                 no_split_module_classes=list(skeleton._no_split_modules or ()))


def apply_on_placed(model, path: str, name: str, device, folder: str) -> Any:
    """``model``, placed by accelerate, with the adapter at ``path`` applied (as ``name``)
    and placed alike, its weights of the modules on disk written to ``folder``.

    Not PEFT's own path for such a model (see the module's docstring): the hooks are taken
    off, the adapter applied (its weights for modules on disk, which PEFT leaves on the meta
    device, loaded after), and the model placed again, the base weights read from where they
    were."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import offload_weight, set_module_tensor_to_device
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    placed = dict(model.hf_device_map)
    index = {key: entry for module in model.modules() if (hook := getattr(module, "_hf_hook", None)) is not None
             for key, entry in getattr(getattr(hook.weights_map, "dataset", None), "index", {}).items()}
    remove_hook_from_submodules(model)
    del model.hf_device_map
    with warnings.catch_warnings():  # each of the adapter's weights for a module on disk, loaded below
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*meta parameter")
        peft = PeftModel.from_pretrained(model, path, adapter_name=name)
    unloaded = [key for key, value in peft.named_parameters() if value.is_meta and f".{name}." in key]
    for key in unloaded:
        value = peft.get_parameter(key)
        set_module_tensor_to_device(peft, key, "cpu", value=value.new_empty(value.shape, device="cpu"))
    loaded = set_peft_model_state_dict(peft, load_peft_weights(path), adapter_name=name)
    missing = set(unloaded) & set(loaded.missing_keys)
    if missing:
        raise CalibrationError(path, f"the adapter holds no weights for {', '.join(sorted(missing))}")
    prefix = "base_model.model"
    device_map = {f"{prefix}.{module}" if module else prefix: place for module, place in placed.items()}
    on_disk = tuple(f"{module}." for module, place in device_map.items() if place == "disk")
    entries: dict[str, dict] = {}
    for key, value in peft.state_dict(keep_vars=True).items():
        if not f"{key}.".startswith(on_disk):
            continue
        own = key.removeprefix(f"{prefix}.").replace(".base_layer.", ".").replace(".original_module.", ".")
        if own in index:
            entries[key] = index[own]
        elif not value.is_meta:
            offload_weight(value.detach(), key, folder, entries)
        else:
            raise CalibrationError(path, f"{key} is on disk and no file holds it")
    dispatch_model(peft, device_map=device_map, main_device=accelerate_key(device), offload_dir=folder, offload_index=entries)
    peft.get_base_model().hf_device_map = placed
    return peft
