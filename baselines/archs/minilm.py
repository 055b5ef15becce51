"""A pretrained text encoder with frozen zero-shot prompt heads: the backbone of the merging benchmark.

Shared: all-MiniLM-L6-v2 (``mtlbench.backbone``; the ``text`` extra), mean pooling over the attention mask and L2
normalisation, as the sentence-transformers model it ships as. Per task: a **frozen** head whose rows are the
normalised pretrained embeddings of one natural-language prompt per class (``tasks/text.py``), logits =
``logit_scale`` · cosine(x, prompt), exactly as CLIP's zero-shot heads in the merging papers
(task_vectors' ``model.freeze_head()``). Why this choice: the heads are identical for the pretrained model, every
expert, every merged model and joint training, so merging is pure encoder merging (nothing a merger would have to
reconcile), and the pretrained model is a real zero-shot row. The heads are buffers, never trained or merged.

By default the embeddings (word, position, type, LayerNorm) and the unused BERT pooler are frozen, as in the
merging benchmark design: the task vectors cover the 6 transformer layers (96 tensors, 10.6 M weights), which
is what every merger merges. ``freeze_embeddings=False`` trains (and merges) them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench.arch import MultiTaskArch
from mtlbench.data import FeatureSchema, TaskSpec
from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_arch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@register_arch("minilm")
class MiniLM(MultiTaskArch):
    """Pretrained all-MiniLM-L6-v2 encoder (text extra) + frozen prompt-embedding heads per task."""

    modality = "text"
    mergeable = True  # a merger may combine fine-tuned copies of `shared.encoder`

    @dataclass
    class Options:
        backbone: str = "all-MiniLM-L6-v2"
        freeze_embeddings: bool = True
        logit_scale: float = 20.0

    @classmethod
    def required_features(cls, options) -> tuple[str, ...]:
        return ("text",)

    def __init__(self, schema: FeatureSchema, tasks: tuple[TaskSpec, ...], embed_dim: int, options=None) -> None:
        super().__init__(schema, tasks, embed_dim, options)
        from mtlbench import backbone
        from mtlbench.tasks.text import class_prompts

        o = options or self.Options()
        if "input_ids" not in schema.extras:
            raise MtlbenchError("arch 'minilm' needs tokenised text (a text dataset such as text8)")
        enc = backbone.load_model(o.backbone)
        for name, p in enc.named_parameters():
            if name.startswith("pooler.") or (o.freeze_embeddings and name.startswith("embeddings.")):
                p.requires_grad_(False)
        self.shared["encoder"] = enc
        self.backbone_sha256 = backbone.weights_sha256(o.backbone)
        tok = backbone.tokenizer(o.backbone)
        enc.eval()
        with torch.no_grad():
            for t in tasks:
                prompts = class_prompts(t.name)
                if len(prompts) != t.output_dim:
                    raise MtlbenchError(f"task '{t.name}' has {t.output_dim} classes but {len(prompts)} prompts")
                e = tok(list(prompts), padding=True, return_tensors="pt")
                emb = mean_pool(enc(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).last_hidden_state,
                                e["attention_mask"])
                self.heads[t.name].register_buffer("prompts", nn.functional.normalize(emb, dim=-1))
        self.logit_scale = float(o.logit_scale)

    def merged_keys(self) -> list[str]:
        """The encoder tensors that experts fine-tune and mergers merge (names inside ``shared.encoder``)."""
        return [n for n, p in self.shared["encoder"].named_parameters() if p.requires_grad]

    def encode(self, batch):
        mask = batch["attention_mask"]
        # dynamic padding: drop the all-padding tail columns of this batch (one host sync per forward)
        width = int(mask.sum(1).max())
        ids, mask = batch["input_ids"][:, :width], mask[:, :width]
        hidden = self.shared["encoder"](input_ids=ids, attention_mask=mask).last_hidden_state
        return (nn.functional.normalize(mean_pool(hidden, mask), dim=-1),)

    def decode(self, features, batch):
        (z,) = features
        return [self.logit_scale * z @ self.heads[t].prompts.t() for t in self.task_names]

    def describe(self):
        return {"backbone": (self.options or self.Options()).backbone, "backbone_sha256": self.backbone_sha256,
                "merged_tensors": len(self.merged_keys()),
                "merged_weights": sum(p.numel() for p in self.shared["encoder"].parameters() if p.requires_grad)}
