"""MPLUG: visual encoder, text encoder, skip-connected fusion, decoder and the pretraining heads."""
from __future__ import annotations

import torch
from torch import nn

from mplug_kernels.backends import BACKENDS

from mplug.model.config import MPLUGConfig
from mplug.model.decoder import TextDecoder
from mplug.model.fusion import FusionEncoder
from mplug.model.text import PredictionHead, TextEncoder
from mplug.model.vision import VisualEncoder


class MPLUG(nn.Module):
    """mPLUG with the official submodule names; every attention runs on ``config.attn_backend``.

    Submodules: ``visual_encoder`` (images -> [B, Lv, hidden]), ``text_encoder`` (ids, mask ->
    [B, Lt, hidden]), ``fusion_encoder`` ((v, v_mask, t, t_mask) -> (v, t)), ``text_decoder``
    (ids, mask, memory -> logits). Heads: ``vision_proj``/``text_proj`` (ITC), ``itm_head``,
    ``mlm_head`` (tied to the text encoder's word embeddings), ``temp`` and the ITC feature queues with their
    image ids (``idx_queue``, -1 = none). ``add_momentum_copies`` adds the momentum copies (``visual_encoder_m``, ...).
    """

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        if not isinstance(config, MPLUGConfig):
            raise TypeError(f"config must be an MPLUGConfig, got {type(config).__name__}")
        check_backend_name(config.attn_backend)
        config = config.replace()
        self.config = config
        self.visual_encoder = VisualEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.fusion_encoder = FusionEncoder(config)
        self.text_decoder = TextDecoder(config)
        self.vision_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.mlm_head = PredictionHead(config, self.text_encoder.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        queue_shape = (config.embed_dim, config.queue_size)
        self.register_buffer("image_queue", nn.functional.normalize(torch.randn(queue_shape), dim=0))
        self.register_buffer("text_queue", nn.functional.normalize(torch.randn(queue_shape), dim=0))
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def add_momentum_copies(self) -> "MPLUG":
        """Add the momentum (EMA) copies of the encoders, projections, fusion, MLM head and decoder, equal to the
        online weights now (mplug.tasks.momentum); pretrain_losses(distill=True) adds them when missing. Returns self."""
        from mplug.tasks.momentum import add_momentum_copies

        return add_momentum_copies(self)

    def set_attn_backend(self, name: str) -> "MPLUG":
        """Run every attention layer on backend ``name`` ('auto' or a registered backend); returns self."""
        check_backend_name(name)
        self.config.attn_backend = name
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = name
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> "MPLUG":
        """Recompute ViT blocks and fusion layers in the backward pass (training only); returns self."""
        self.config.gradient_checkpointing = bool(enabled)
        self.visual_encoder.visual.transformer.gradient_checkpointing = bool(enabled)
        self.fusion_encoder.gradient_checkpointing = bool(enabled)
        return self

    def pretrain_losses(self, images, text_ids, text_mask, **kw):
        """ITC, ITM, MLM and PrefixLM losses (mplug.tasks.pretraining.pretrain_losses)."""
        from mplug.tasks import pretraining

        return pretraining.pretrain_losses(self, images, text_ids, text_mask, **kw)

    def vqa_generate(self, images, question_ids, question_mask, **kw):
        """Beam-searched answers to questions about images (mplug.tasks.inference.vqa_generate)."""
        from mplug.tasks import inference

        return inference.vqa_generate(self, images, question_ids, question_mask, **kw)

    def caption_generate(self, images, **kw):
        """Beam-searched captions (mplug.tasks.inference.caption_generate)."""
        from mplug.tasks import inference

        return inference.caption_generate(self, images, **kw)

    def vqa_loss(self, images, question_ids, question_mask, answer_ids, answer_mask, weights, answers_per_question):
        """VQA fine-tuning loss over weighted answer lists (mplug.tasks.finetune.vqa_loss)."""
        from mplug.tasks import finetune

        return finetune.vqa_loss(self, images, question_ids, question_mask, answer_ids, answer_mask, weights, answers_per_question)

    def caption_loss(self, images, caption_ids, caption_mask, prompt_length: int = 0):
        """Caption cross-entropy, the prompt not predicted (mplug.tasks.finetune.caption_loss)."""
        from mplug.tasks import finetune

        return finetune.caption_loss(self, images, caption_ids, caption_mask, prompt_length)

    def caption_scst_loss(self, images, references, cider, **kw):
        """Self-critical caption training rewarded by CIDEr-D (mplug.tasks.finetune.caption_scst_loss)."""
        from mplug.tasks import finetune

        return finetune.caption_scst_loss(self, images, references, cider, **kw)

    def retrieval_loss(self, images, text_ids, text_mask, image_ids, **kw):
        """Retrieval fine-tuning ITC + ITM, same image id = positive (mplug.tasks.finetune.retrieval_loss)."""
        from mplug.tasks import finetune

        return finetune.retrieval_loss(self, images, text_ids, text_mask, image_ids, **kw)

    def retrieval_scores(self, images, text_ids, text_mask, **kw):
        """ITC top-k candidates re-ranked by ITM (mplug.tasks.inference.retrieval_scores)."""
        from mplug.tasks import inference

        return inference.retrieval_scores(self, images, text_ids, text_mask, **kw)

    def encode_video(self, frames, frame_mask=None):
        """frames [B, T, 3, S, S] -> VideoMemory (embeds [B, T * Lv, hidden], mask [B, T * Lv]) (mplug.tasks.video)."""
        from mplug.tasks import video

        return video.encode_video(self, frames, frame_mask)

    def video_qa_generate(self, frames, question_ids, question_mask=None, frame_mask=None, **kw):
        """Beam-searched answers to questions about videos (mplug.tasks.video.video_qa_generate)."""
        from mplug.tasks import video

        return video.video_qa_generate(self, frames, question_ids, question_mask, frame_mask, **kw)

    def video_qa_rank(self, frames, question_ids, question_mask, answer_ids, answer_mask, frame_mask=None, **kw):
        """The answer list ranked for questions about videos, the authors' video QA (mplug.tasks.video.video_qa_rank)."""
        from mplug.tasks import video

        return video.video_qa_rank(self, frames, question_ids, question_mask, answer_ids, answer_mask, frame_mask, **kw)

    def video_caption_generate(self, frames, frame_mask=None, **kw):
        """Beam-searched captions of videos (mplug.tasks.video.video_caption_generate)."""
        from mplug.tasks import video

        return video.video_caption_generate(self, frames, frame_mask, **kw)

    def video_retrieval_scores(self, frames, text_ids, text_mask=None, frame_mask=None, **kw):
        """Text-video ITC scores re-ranked by ITM (mplug.tasks.video.video_retrieval_scores)."""
        from mplug.tasks import video

        return video.video_retrieval_scores(self, frames, text_ids, text_mask, frame_mask, **kw)

    def add_classifier_heads(self) -> "MPLUG":
        """Add the SNLI-VE and NLVR2 heads ``ve_head`` / ``nlvr_head`` when missing (mplug.tasks.classification); returns self."""
        from mplug.tasks import classification

        return classification.add_classifier_heads(self)

    def ve_loss(self, images, text_ids, text_mask, labels):
        """SNLI-VE 3-way cross-entropy over the fused [CLS] (mplug.tasks.classification.ve_loss)."""
        from mplug.tasks import classification

        return classification.ve_loss(self, images, text_ids, text_mask, labels)

    def ve_predict(self, images, text_ids, text_mask=None):
        """SNLI-VE classes [B] (mplug.tasks.classification.ve_predict)."""
        from mplug.tasks import classification

        return classification.ve_predict(self, images, text_ids, text_mask)

    def nlvr_loss(self, images, text_ids, text_mask, labels):
        """NLVR2 cross-entropy over image pairs [B, 2, 3, H, W] (mplug.tasks.classification.nlvr_loss)."""
        from mplug.tasks import classification

        return classification.nlvr_loss(self, images, text_ids, text_mask, labels)

    def nlvr_predict(self, images, text_ids, text_mask=None):
        """NLVR2 labels [B] of image pairs (mplug.tasks.classification.nlvr_predict)."""
        from mplug.tasks import classification

        return classification.nlvr_predict(self, images, text_ids, text_mask)

    def ground(self, images, text_ids, text_mask=None):
        """Boxes [B, 4] (normalised cx, cy, w, h) of referring expressions (mplug.tasks.grounding.ground)."""
        from mplug.tasks import grounding

        return grounding.ground(self, images, text_ids, text_mask)

    def grounding_loss(self, images, text_ids, text_mask, boxes):
        """Coordinate-token loss weighted by L1 and 1 - GIoU (mplug.tasks.grounding.grounding_loss)."""
        from mplug.tasks import grounding

        return grounding.grounding_loss(self, images, text_ids, text_mask, boxes)


def check_backend_name(name) -> None:
    """The backend must be 'auto' or a registered backend name."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"attn_backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
