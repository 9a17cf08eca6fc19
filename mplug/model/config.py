"""MPLUGConfig: every size of the mPLUG model (base, large and a few-MB tiny one for tests)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FUSIONS = ("skip", "connected", "two_way")
FUSION_ALIASES = {"coattn": "two_way"}  # the name "two_way" had before; still read from old configs and checkpoints


@dataclass
class MPLUGConfig:
    """Sizes and switches of mPLUG; ``base()``, ``large()`` and ``tiny()`` give the standard ones.

    fusion: "skip" (the paper's skip-connected network: layer k is connected attention when
    k != 0 and k % stride_layer == 0, asymmetric co-attention otherwise), "connected" (every fusion
    layer is connected attention over [v; t]) or "two_way" (co-attention in both directions; "coattn" is
    read as "two_way").
    attn_backend: "auto" or a backend name of mplug_kernels.backends.
    momentum, alpha: momentum distillation's EMA rate and distillation weight (ALBEF; alpha ramps over epoch 0).
    """

    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    patch_size: int = 16
    image_size: int = 384
    vision_layer_norm_eps: float = 1e-5
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6
    fusion_layers: int = 6
    stride_layer: int = 3
    decoder_layers: int = 12
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    embed_dim: int = 256
    queue_size: int = 65536
    temp: float = 0.07
    momentum: float = 0.995
    alpha: float = 0.4
    fusion: str = "skip"
    attn_backend: str = "auto"
    dropout: float = 0.1
    gradient_checkpointing: bool = False
    bos_token_id: int = 101
    eos_token_id: int = 102
    pad_token_id: int = 0
    mask_token_id: int = 103

    def __post_init__(self):
        self.fusion = FUSION_ALIASES.get(self.fusion, self.fusion)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for width, heads, what in (
            (self.hidden_size, self.num_heads, "hidden_size / num_heads"),
            (self.vision_width, self.vision_heads, "vision_width / vision_heads"),
        ):
            if heads < 1 or width % heads != 0:
                raise ValueError(f"{what} = {width} / {heads} must divide evenly")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"momentum and alpha must be in [0, 1], got momentum={self.momentum}, alpha={self.alpha}")
        if self.stride_layer < 1:
            raise ValueError(f"stride_layer must be >= 1, got {self.stride_layer}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"{name} = {token} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def num_patches(self) -> int:
        """Patches per image side squared."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visual_tokens(self) -> int:
        """Lv = patches + the class token."""
        return self.num_patches + 1

    def is_connected_layer(self, k: int) -> bool:
        """Whether fusion layer k is connected attention (SPEC.md's stride rule for "skip")."""
        if self.fusion == "connected":
            return True
        if self.fusion == "two_way":
            return False
        return k != 0 and k % self.stride_layer == 0

    def replace(self, **changes) -> "MPLUGConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def base(cls, **changes) -> "MPLUGConfig":
        """mPLUG-base: ViT-B/16 at 384 (Lv 577), BERT-base text/fusion/decoder, stride 3."""
        return cls(**changes)

    @classmethod
    def large(cls, **changes) -> "MPLUGConfig":
        """mPLUG-large: ViT-L/14 at 336 (Lv 577) projected to 768, BERT-base text side, stride 6."""
        sizes = dict(vision_width=1024, vision_layers=24, vision_heads=16, patch_size=14, image_size=336, stride_layer=6)
        return cls(**{**sizes, **changes})

    @classmethod
    def tiny(cls, **changes) -> "MPLUGConfig":
        """A few-MB model for tests: every layer type present (vision projection and one connected layer)."""
        sizes = dict(
            vision_width=48, vision_layers=2, vision_heads=3, patch_size=8, image_size=32,
            hidden_size=64, num_heads=4, intermediate_size=128, text_layers=2, fusion_layers=4,
            stride_layer=2, decoder_layers=2, vocab_size=200, max_position_embeddings=64,
            embed_dim=32, queue_size=8, dropout=0.0,
        )
        return cls(**{**sizes, **changes})
