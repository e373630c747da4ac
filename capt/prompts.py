"""PromptedCLIP: multi-modal deep prompts on a frozen open_clip CLIP (MaPLe-style, see
``shared/reference/capt-method.md``).

Text side: ``text_n_ctx`` learnable vectors follow the start token. They are initialised from the
first words of the hand template (``"a photo of a {}."``) and those words are dropped from the
tokenised text, so with ``text_n_ctx == 4`` the untrained prompt is exactly the hand prompt. The
tokenised text is ``n_ctx`` tokens shorter than the model's context, because open_clip's causal mask
and positional embedding are fixed to that length.

Vision side: ``vision_n_ctx`` tokens follow the CLS token (inserted after open_clip's ``ln_pre``;
our reading) and are removed again before pooling, so every pooling type works unchanged.

Deep prompts: inserted at layer 0, replaced at layers ``1..depth-1``. Coupling ``maple`` makes the
vision prompts of layer ``j`` a linear map of the text prompts of layer ``j``; ``independent`` learns
them on their own. Only prompts and coupling layers are trainable; CLIP stays frozen.

Label sets are not part of the module: :meth:`PromptedCLIP.tokenize` turns any list of class names
into tokens at call time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from .data.templates import check_template
from .models import ClipModel
from .options import Options

COUPLINGS = ("independent", "maple")
TEXT_DEEP_INITS = ("random", "identity")


@dataclass
class PromptConfig(Options):
    SECTION = "prompt"

    text_n_ctx: int = 0
    text_depth: int = 1
    vision_n_ctx: int = 0
    vision_depth: int = 1
    coupling: str = "independent"
    template: str = "a photo of a {}."
    init_std: float = 0.02
    # Deep text prompts (layers 1..text_depth-1) start as ``random`` vectors (std init_std; MaPLe's init)
    # or as ``identity``: the hidden states the context tokens have there anyway, so that, untrained, they
    # change nothing on the text side (the context follows the start token, and the causal mask keeps its
    # hidden states independent of the class name).
    text_deep_init: str = "random"
    # The image tower's own weights train too (TeCoA-style adversarial fine-tuning; with no prompts it
    # is exactly that). They are saved with the prompts, so a checkpoint stays the whole delta.
    tune_image_tower: bool = False

    def __post_init__(self):
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got '{self.coupling}'")
        check_template(self.template)
        if self.text_deep_init not in TEXT_DEEP_INITS:
            raise ValueError(f"text_deep_init must be one of {TEXT_DEEP_INITS}, got '{self.text_deep_init}'")
        for name in ("text_n_ctx", "vision_n_ctx"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("text_depth", "vision_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.coupling == "maple" and (self.text_n_ctx, self.text_depth) != (self.vision_n_ctx, self.vision_depth):
            raise ValueError("maple coupling maps text prompts to vision prompts layer by layer: "
                             "text and vision n_ctx and depth must be equal")



class PromptedCLIP(nn.Module):
    def __init__(self, clip: ClipModel, config: PromptConfig | None = None):
        super().__init__()
        config = config or PromptConfig()
        self.base_clip = clip  # the ClipModel (architecture, weights' source) this model was built on
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.clip = clip.model
        self.tokenizer = clip.tokenizer
        self.preprocess_cfg = clip.preprocess_cfg
        self.model_name = clip.name
        self.pretrained = clip.pretrained
        self.quick_gelu = clip.quick_gelu
        model = self.clip
        if not model.transformer.batch_first or not model.visual.transformer.batch_first:
            raise NotImplementedError("PromptedCLIP needs open_clip's batch_first transformers (open_clip >= 2.24)")
        if not hasattr(model, "token_embedding") or not hasattr(model.visual, "_embeds"):
            raise NotImplementedError(f"{clip.name}: prompts need a ViT image tower and open_clip's own text transformer")

        text_layers, vision_layers = len(model.transformer.resblocks), len(model.visual.transformer.resblocks)
        if config.coupling == "maple":  # coupled layer by layer: both towers get the shallower depth
            text_layers = vision_layers = min(text_layers, vision_layers)
        # A config written for ViT-B (depth 9) still runs on shallower models: depth is capped.
        config = PromptConfig.from_dict({**config.to_dict(),
                                         "text_depth": min(config.text_depth, text_layers),
                                         "vision_depth": min(config.vision_depth, vision_layers)})
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(self.preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)

        text_width, vision_width = model.transformer.width, model.visual.transformer.width
        prefix, self.template_suffix = config.template.split("{}")
        prefix_ids = self.tokenizer.encode(prefix.strip()) if prefix.strip() else []
        self.n_dropped = min(config.text_n_ctx, len(prefix_ids))
        if config.text_n_ctx:
            ctx = torch.randn(config.text_n_ctx, text_width) * config.init_std
            if self.n_dropped:
                # The dropped template words sit right before the class name, as they did in the text.
                init_ids = torch.tensor(prefix_ids[: self.n_dropped])
                ctx[-self.n_dropped:] = model.token_embedding.weight[init_ids].detach().float()
            self.text_ctx = nn.Parameter(ctx)
            self.text_deep = nn.Parameter(torch.randn(config.text_depth - 1, config.text_n_ctx, text_width) * config.init_std)
            if config.text_deep_init == "identity" and config.text_depth > 1:
                self.text_deep.data.copy_(self._context_hidden_states())
        if config.vision_n_ctx:
            if config.coupling == "maple":
                self.coupling = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(config.vision_depth))
            else:
                self.vision_ctx = nn.Parameter(torch.randn(config.vision_depth, config.vision_n_ctx, vision_width) * config.init_std)
        if config.tune_image_tower:
            model.visual.requires_grad_(True)
        self._prompts_enabled = True

    # ---- prompts -------------------------------------------------------------------------------
    def prompt_parameters(self) -> dict[str, torch.Tensor]:
        """What training changes: the prompts and coupling layers, and the image tower's weights when
        ``tune_image_tower``."""
        tuned = ("clip.visual.",) if self.config.tune_image_tower else ()
        return {name: p for name, p in self.named_parameters()
                if not name.startswith("clip.") or name.startswith(tuned)}

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.prompt_parameters().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.prompt_parameters()
        if set(own) != set(state):
            raise ValueError(f"prompt checkpoint does not fit this model: expected {sorted(own)}, got {sorted(state)}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"prompt tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(tensor)

    @contextlib.contextmanager
    def prompts_disabled(self):
        """Run as the frozen CLIP with the hand template (the f_0 of the CAPT loss)."""
        previous, self._prompts_enabled = self._prompts_enabled, False
        try:
            yield self
        finally:
            self._prompts_enabled = previous

    @property
    def text_prompted(self) -> bool:
        return self._prompts_enabled and self.config.text_n_ctx > 0

    @property
    def vision_prompted(self) -> bool:
        return self._prompts_enabled and self.config.vision_n_ctx > 0

    @torch.no_grad()
    def _context_hidden_states(self) -> torch.Tensor:
        """The context tokens' hidden states at the input of text layers 1..text_depth-1, with no deep
        prompts. Under the causal mask they depend only on the start token and the context, so the
        sequence [start, context] gives them for every class name."""
        model, n_ctx = self.clip, self.config.text_n_ctx
        start = self.tokenizer([""])[:, :1].to(model.token_embedding.weight.device)
        x = torch.cat([model.token_embedding(start)[0], self.text_ctx.detach()], dim=0).unsqueeze(0)
        x = x + model.positional_embedding[: 1 + n_ctx]
        mask = model.attn_mask[: 1 + n_ctx, : 1 + n_ctx] if model.attn_mask is not None else None
        states = []
        for block in model.transformer.resblocks[: self.config.text_depth - 1]:
            x = block(x, attn_mask=mask)
            states.append(x[0, 1:].float())
        return torch.stack(states)

    def _text_prompts(self) -> list[torch.Tensor]:
        return [self.text_ctx, *self.text_deep.unbind(0)]

    def _vision_prompts(self) -> list[torch.Tensor]:
        if self.config.coupling == "maple":
            return [proj(p) for proj, p in zip(self.coupling, self._text_prompts())]
        return list(self.vision_ctx.unbind(0))

    # ---- text --------------------------------------------------------------------------------
    def tokenize(self, classnames: Sequence[str], template: str | None = None) -> torch.Tensor:
        """Token ids for a label set. With text prompts on, the learned context stands in for the
        template's first words; otherwise ``template`` (default: the configured one) is used as is."""
        template = template or self.config.template
        texts = [template.format(name) for name in classnames]
        context_length = self.clip.context_length
        if not self.text_prompted:
            return self.tokenizer(texts, context_length=context_length)
        n_ctx, n_drop = self.config.text_n_ctx, self.n_dropped
        tokens = self.tokenizer(texts, context_length=context_length - n_ctx + n_drop)
        return torch.cat([tokens[:, :1], tokens[:, 1 + n_drop:]], dim=1)

    def fits_context(self, classnames: Sequence[str], template: str | None = None) -> list[bool]:
        """Whether each label's text fits the context ``tokenize`` gives it (else it would be cut)."""
        template = template or self.config.template
        texts = [template.format(name) for name in classnames]
        room = self.clip.context_length
        if self.text_prompted:
            room += self.n_dropped - self.config.text_n_ctx
        wider = self.tokenizer(texts, context_length=room + 1)  # one more slot: used only by texts that overflow
        return (wider[:, room] == 0).tolist()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features; equals ``clip.encode_text(tokens, normalize=True)`` without prompts."""
        model = self.clip
        tokens = tokens.to(self.pixel_mean.device)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)
        n_ctx = self.config.text_n_ctx if self.text_prompted else 0
        if n_ctx:
            prompts = self._text_prompts()
            ctx = prompts[0].to(cast_dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)
        x = x + model.positional_embedding.to(cast_dtype)
        for layer, block in enumerate(model.transformer.resblocks):
            if n_ctx and 0 < layer < len(prompts):
                deep = prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n_ctx:]], dim=1)
            x = self._run_block(block, x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        pool_tokens = tokens
        if n_ctx:
            # Pool where open_clip would (EOT/EOS position), shifted past the inserted context.
            pad = tokens.new_zeros(tokens.shape[0], n_ctx)
            pool_tokens = torch.cat([tokens[:, :1], pad, tokens[:, 1:]], dim=1)
        x = text_global_pool(x, pool_tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
        return F.normalize(x, dim=-1)

    def set_grad_checkpointing(self, enabled: bool = True) -> "PromptedCLIP":
        """Recompute each transformer block in the backward pass instead of keeping its activations.
        The text tower of a 1000-class label set (ImageNet) keeps about 3 GB of activations per block
        for the prompts' gradient (ViT-B/32: 1000 texts x 77 tokens x width 512, fp32); with this on it
        keeps one block's plus each block's input, for about a third more compute. The values and
        gradients are those of the plain forward (the same operations, run again)."""
        self.grad_checkpointing = enabled
        return self

    def _run_block(self, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)

    def encode_labels(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Class embeddings ``[C, D]`` of a label set. Several templates (hand prompts only) are
        averaged CLIP-style; with text prompts the learned context is the template."""
        if self.text_prompted or not templates:
            return self.encode_text(self.tokenize(classnames))
        per_template = torch.stack([self.encode_text(self.tokenize(classnames, t)) for t in templates])
        return F.normalize(per_template.mean(0), dim=-1)

    # ---- image -------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features from pixels in [0, 1] (normalisation happens here)."""
        visual = self.clip.visual
        x = (pixels - self.pixel_mean) / self.pixel_std
        x = visual._embeds(x)
        n_ctx = self.config.vision_n_ctx if self.vision_prompted else 0
        if n_ctx:
            prompts = self._vision_prompts()
        for layer, block in enumerate(visual.transformer.resblocks):
            if n_ctx and layer < len(prompts):
                deep = prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                rest = x[:, 1:] if layer == 0 else x[:, 1 + n_ctx:]
                x = torch.cat([x[:, :1], deep, rest], dim=1)
            x = self._run_block(block, x)
        if n_ctx:
            x = torch.cat([x[:, :1], x[:, 1 + n_ctx:]], dim=1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1)

    # ---- classification ----------------------------------------------------------------------
    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        logits = self.clip.logit_scale.exp() * image_features @ text_features.t()
        if self.clip.logit_bias is not None:
            logits = logits + self.clip.logit_bias
        return logits

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of images against the label set given as tokens (one call, for DDP)."""
        return self.logits(self.encode_image(pixels), self.encode_text(tokens))

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never changes behaviour, whatever the prompts do
        return self


class ZeroShotClassifier(nn.Module):
    """Pixels -> logits over a fixed label set whose class embeddings are given (e.g. for attacks)."""

    def __init__(self, model: PromptedCLIP, class_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings.detach())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model.encode_image(pixels), self.class_embeddings)
