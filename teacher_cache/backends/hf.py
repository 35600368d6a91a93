"""The transformers backend: the correctness reference, and the one that sees attention."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from teacher_cache import attention
from teacher_cache.backends import TeacherOutput
from teacher_cache.models import ModelRef
from teacher_cache.tokenize import Tokenized

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HfBackend:
    """Batched, no-grad forward in the model's dtype; lm_head only at target positions."""

    name = "hf"

    def __init__(
        self,
        model: ModelRef,
        *,
        attention_layers: tuple[int, ...] = (),
        logits: bool = True,
        device: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
    ) -> None:
        from teacher_cache.models import load_causal_lm

        self.ref = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES.get(model.dtype, torch.float32)
        self.attention_layers = tuple(attention_layers)
        self.want_logits = logits
        impl = attention.register() if self.attention_layers else "sdpa"
        self.model = load_causal_lm(
            model.path,
            role="the teacher",
            progress=progress,
            # attention rows only: the layers past the deepest summarised one are never needed
            layers=None if logits or not self.attention_layers else max(self.attention_layers) + 1,
            revision=model.revision,
            dtype=self.dtype,
            attn_implementation=impl,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        ).to(self.device)
        self.model.eval()
        self.sliding_window = attention.sliding_window_of(self.model.config)
        if self.attention_layers:
            attention.attach(self.model, list(self.attention_layers), None)  # range check now

    def describe(self) -> dict:
        import transformers

        return {
            "backend": self.name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    @torch.no_grad()
    def forward(self, batch: list[Tokenized]) -> Iterator[TeacherOutput]:
        B = len(batch)
        lengths = [len(s.input_ids) for s in batch]
        T = max(lengths)
        ids = torch.zeros((B, T), dtype=torch.long)  # [B, T] right-padded
        mask = torch.zeros((B, T), dtype=torch.long)  # [B, T]
        for b, s in enumerate(batch):
            ids[b, : lengths[b]] = torch.from_numpy(s.input_ids)
            mask[b, : lengths[b]] = 1
        positions = [torch.from_numpy(s.target_positions).to(self.device) for s in batch]  # [P_b] each
        capture = None
        if self.attention_layers:
            capture = attention.RowCapture(positions, lengths, self.sliding_window)
            attention.attach(self.model, list(self.attention_layers), capture)
        try:
            hidden = self.model.get_decoder()(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state  # [B, T, D], final norm applied
        finally:
            if capture is not None:
                attention.attach(self.model, list(self.attention_layers), None)
        for b in range(B):
            logits = hidden[b, positions[b]].float() @ self._head.T if self.want_logits else None  # float32 [P, V]
            attn = {layer: capture.rows[layer][b] for layer in self.attention_layers} if capture else None
            yield TeacherOutput(logits=logits, topk=None, attention=attn)

    @functools.cached_property
    def _head(self) -> torch.Tensor:
        """The output projection in float32 [V, D] (as vLLM's hidden mode: a bf16 one is ~0.2 nats
        off at logits ~40), made once: a bf16 Mixtral's is a 0.5 GB copy, which every batch made."""
        return self.model.get_output_embeddings().weight.float()

    def close(self) -> None:
        self.__dict__.pop("_head", None)
        del self.model
