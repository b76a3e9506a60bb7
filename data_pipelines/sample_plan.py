"""One record -> one docs/packed_sequence.md §4.2 sample plan: the sample's tokens laid out exactly as BAGEL's
`pack_sequence` does (rope counter, split modes, CE labels, ViT patches, VAE images and latent-token grids, CFG
dropout).

Builders per task (mirroring BAGEL's datasets):
  understanding  images -> ViT conditions (no CFG), texts causal, CE on 'answer' texts (VLM-SFT path)
  generation /   'input' image -> clean VAE (full, t = -inf) then ViT condition; 'target' image -> noised VAE
  interleaved    (noise, rope not advanced), followed by a clean VAE + ViT copy when more segments follow
                 (the edit builder order: noised, clean, ViT); 'context' texts are CFG-droppable prompts.
A record with an explicit plan (schema.PlanSpec, e.g. from the UniMedVL-format readers) is laid out item by item
instead, with the same §4.2 rules (docs/unimedvl_format.md "Explicit item plans").
Local indices (token, split, image) start at 0 per sample; the Packer offsets them into a pack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.schema import Record, decode_image
from data_pipelines.transforms import ImageTransform, patchify_vit
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE, TEXT, VAE, VIT
from unimedvl_jax.patches import flattened_position_ids, grid_rows_cols
from unimedvl_jax.tokenizers import check_compatible


@dataclasses.dataclass(frozen=True)
class CfgDropout:
    """CFG condition-dropout probabilities (docs/packed_sequence.md §4.5): text skips without a rope move, ViT/VAE skip
    with rope += 1."""

    text: float = 0.0
    vit: float = 0.0
    vae: float = 0.0

    def __post_init__(self):
        for name in ("text", "vit", "vae"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"cfg dropout {name}={getattr(self, name)} not in [0, 1]")

    @classmethod
    def from_config(cls, c) -> "CfgDropout":
        """From a mapping / ConfigDict with keys text, vit, vae."""
        return cls(float(c["text"]), float(c["vit"]), float(c["vae"]))


NO_DROPOUT = CfgDropout()


@dataclasses.dataclass(frozen=True)
class Transforms:
    """The ViT and VAE image transforms of a pipeline (docs/preprocessing.md §6)."""

    vit: ImageTransform
    vae: ImageTransform

    @classmethod
    def from_config(cls, data_cfg) -> "Transforms":
        """From data_cfg.vit_transform / data_cfg.vae_transform."""
        return cls(ImageTransform.from_config(data_cfg["vit_transform"]),
                   ImageTransform.from_config(data_cfg["vae_transform"]))


@dataclasses.dataclass
class PlanItem:
    """What one sequence-plan item became: kind, role flags, dropout, its rope id and its local token span."""

    kind: str               # 'text' | 'vit' | 'vae'
    segment: int            # index of the record segment it comes from
    loss: bool = False      # CE (text) or flow-matching MSE (noised VAE)
    noised: bool = False
    dropped: bool = False
    rope: int = 0           # position id of its first token (rope counter before the item)
    start: int = -1         # local index of its first token; -1 when dropped
    length: int = 0


@dataclasses.dataclass
class SamplePlan:
    """A sample's tokens with local indices (see module docstring); arrays are numpy."""

    record_id: str
    task: str
    items: list[PlanItem]
    text_ids: np.ndarray        # (L,) ids at TEXT tokens, 0 elsewhere
    token_kind: np.ndarray      # (L,) TEXT / VIT / VAE
    split_index: np.ndarray     # (L,) local split of each token
    split_modes: np.ndarray     # (S,) CAUSAL / FULL / NOISE per local split
    position_ids: np.ndarray    # (L,)
    ce_index: np.ndarray        # (C,) local token positions with a label
    ce_labels: np.ndarray       # (C,)
    vit_patches: np.ndarray     # (Pv, p·p·3)
    vit_position_ids: np.ndarray
    vit_image: np.ndarray       # (Pv,) local ViT image index
    vit_token_index: np.ndarray  # (Pv,) local token positions
    vae_images: list[np.ndarray]  # each (H, W, 3) in [-1, 1]
    vae_token_image: np.ndarray  # (Vv,) local VAE image index
    vae_token_row: np.ndarray
    vae_token_col: np.ndarray
    vae_position_ids: np.ndarray
    vae_token_index: np.ndarray  # (Vv,) local token positions
    vae_timestep: np.ndarray     # (Vv,) n for noised images, -inf for clean ones

    @property
    def num_tokens(self) -> int:
        return int(self.token_kind.shape[0])

    @property
    def num_vit_images(self) -> int:
        return int(self.vit_image.max()) + 1 if self.vit_image.size else 0

    def usage(self) -> dict[str, int]:
        """Budget name -> amount this sample needs (the Packer's budget names)."""
        kind = self.token_kind
        return {"max_tokens": self.num_tokens,
                "und_capacity": int(np.sum((kind == TEXT) | (kind == VIT))),
                "gen_capacity": int(np.sum(kind == VAE)),
                "max_ce": int(self.ce_index.shape[0]),
                "max_vit_patches": int(self.vit_patches.shape[0]),
                "max_vae_tokens": int(self.vae_token_index.shape[0]),
                "max_vae_images": len(self.vae_images)}


class PlanBuilder:
    """Accumulates one sample's items with the docs/packed_sequence.md §4.2 rope / split / label rules, in the order
    they are added (`text`, `vit_image`, `vae_image`), then `build()`s its SamplePlan.

    record_to_plan drives it from a record; tests drive it directly with token ids and pixels
    (unimedvl_jax.testing). `special_label` on any item is the CE label of its closing special token
    (<|im_end|> / <|vision_end|>), as BAGEL's `special_token_loss` items.
    """

    def __init__(self, record_id: str, model_cfg):
        self.record_id = record_id
        self.vocab = int(model_cfg.llm.vocab_size)
        st = model_cfg.special_tokens
        self.bos, self.eos, self.soi, self.eoi = self._ids(
            [st.bos_token_id, st.eos_token_id, st.start_of_image, st.end_of_image], "special token ids")
        self.vit_patch = int(model_cfg.vit.patch_size)
        self.vit_side = int(model_cfg.vit_max_num_patch_per_side)
        self.latent_stride = int(model_cfg.vae.downsample) * int(model_cfg.latent_patch_size)
        self.latent_side = int(model_cfg.max_latent_size)
        self.rope = 0
        self.items: list[PlanItem] = []
        self.kind, self.text_ids, self.split, self.pos, self.modes = [], [], [], [], []
        self.ce_index, self.ce_labels = [], []
        self.vit = {k: [] for k in ("patches", "pos", "image", "index")}
        self.vae = {k: [] for k in ("image", "row", "col", "pos", "index", "t")}
        self.vae_images: list[np.ndarray] = []
        self.n_vit_images = 0

    def _ids(self, ids, what) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(f"record {self.record_id!r}: {what} {bad[:5]} outside [0, {self.vocab})")
        return ids

    def _special_label(self, start, length, label) -> None:
        """CE label at the closing special token of the item spanning [start, start + length)."""
        if label is not None:
            self.ce_index.append(start + length - 1)
            self.ce_labels += self._ids([label], "special token label")

    def _split(self, kinds, ids, positions, mode) -> int:
        start = len(self.kind)
        self.kind += kinds
        self.text_ids += ids
        self.pos += list(positions)
        self.split += [len(self.modes)] * len(kinds)
        self.modes.append(mode)
        return start

    def _image_split(self, kind, n, mode) -> int:
        """[start_of_image] + n image tokens + [end_of_image], all at the current rope id."""
        return self._split([TEXT] + [kind] * n + [TEXT], [self.soi] + [0] * n + [self.eoi],
                           [self.rope] * (n + 2), mode)

    def _grid(self, pixels, stride, side, what):
        h, w = pixels.shape[0] // stride, pixels.shape[1] // stride
        if pixels.shape[0] % stride or pixels.shape[1] % stride:
            raise ValueError(f"record {self.record_id!r}: {what} image {pixels.shape[:2]} is not a multiple of "
                             f"{stride}")
        if h > side or w > side:
            raise ValueError(f"record {self.record_id!r}: {what} grid {h}x{w} exceeds the {side}x{side} position "
                             f"table; lower the {what} transform's max_size")
        return (h, w, *grid_rows_cols(h, w))

    def text(self, ids, *, segment, loss, dropped, special_label=None):
        """[bos] + ids + [eos], causal, rope advances by L+2; CE on [bos, ids] -> [ids, eos] when loss."""
        item = PlanItem("text", segment, loss=loss, dropped=dropped, rope=self.rope)
        self.items.append(item)
        if dropped:  # text CFG dropout: no tokens, rope unchanged
            return
        toks = [self.bos] + self._ids(ids, "token ids") + [self.eos]
        item.start = self._split([TEXT] * len(toks), toks, range(self.rope, self.rope + len(toks)), CAUSAL)
        item.length = len(toks)
        self.rope += len(toks)
        if loss:
            self.ce_index += range(item.start, item.start + len(toks) - 1)
            self.ce_labels += toks[1:]
        self._special_label(item.start, item.length, special_label)  # with or without loss, as BAGEL

    def vit_image(self, pixels, *, segment, dropped, special_label=None):
        """[soi] + patches + [eoi] at one rope id, full attention; rope += 1 (also when dropped)."""
        item = PlanItem("vit", segment, dropped=dropped, rope=self.rope)
        self.items.append(item)
        if not dropped:
            h, w, r, c = self._grid(pixels, self.vit_patch, self.vit_side, "ViT")
            item.start, item.length = self._image_split(VIT, h * w, FULL), h * w + 2
            self.vit["patches"].append(patchify_vit(pixels, self.vit_patch).astype(np.float32))
            self.vit["pos"].append(flattened_position_ids(h, w, self.vit_side))
            self.vit["image"].append(np.full(h * w, self.n_vit_images))
            self.vit["index"].append(np.arange(item.start + 1, item.start + 1 + h * w))
            self.n_vit_images += 1
            self._special_label(item.start, item.length, special_label)
        self.rope += 1

    def vae_image(self, pixels, *, segment, noised, timestep, dropped, special_label=None):
        """[soi] + latent tokens + [eoi] at one rope id; noised: mode noise, rope kept; clean: full, rope += 1."""
        item = PlanItem("vae", segment, loss=noised, noised=noised, dropped=dropped, rope=self.rope)
        self.items.append(item)
        if dropped:
            self.rope += 1
            return
        h, w, r, c = self._grid(pixels, self.latent_stride, self.latent_side, "VAE")
        item.start, item.length = self._image_split(VAE, h * w, NOISE if noised else FULL), h * w + 2
        self.vae["image"].append(np.full(h * w, len(self.vae_images)))
        self.vae["row"].append(r), self.vae["col"].append(c)
        self.vae["pos"].append(flattened_position_ids(h, w, self.latent_side))
        self.vae["index"].append(np.arange(item.start + 1, item.start + 1 + h * w))
        self.vae["t"].append(np.full(h * w, float(timestep) if noised else -np.inf))
        self.vae_images.append(np.asarray(pixels, np.float32))
        self._special_label(item.start, item.length, special_label)
        if not noised:
            self.rope += 1

    def build(self, task: str) -> SamplePlan:
        if not self.kind:
            raise ValueError(f"record {self.record_id!r}: the sample has no tokens (every item was dropped)")
        i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
        cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
        patch_dim = self.vit_patch * self.vit_patch * 3
        return SamplePlan(
            record_id=self.record_id, task=task, items=self.items, text_ids=i32(self.text_ids),
            token_kind=i32(self.kind), split_index=i32(self.split), split_modes=i32(self.modes),
            position_ids=i32(self.pos), ce_index=i32(self.ce_index), ce_labels=i32(self.ce_labels),
            vit_patches=(np.concatenate(self.vit["patches"]) if self.vit["patches"]
                         else np.zeros((0, patch_dim), np.float32)),
            vit_position_ids=cat(self.vit["pos"], np.int32), vit_image=cat(self.vit["image"], np.int32),
            vit_token_index=cat(self.vit["index"], np.int32), vae_images=self.vae_images,
            vae_token_image=cat(self.vae["image"], np.int32), vae_token_row=cat(self.vae["row"], np.int32),
            vae_token_col=cat(self.vae["col"], np.int32), vae_position_ids=cat(self.vae["pos"], np.int32),
            vae_token_index=cat(self.vae["index"], np.int32), vae_timestep=cat(self.vae["t"], np.float32))


class _Images:
    """The record's images, each decoded once and transformed on request."""

    def __init__(self, record: Record):
        self.record, self.decoded = record, {}

    def __call__(self, index: int, transform: ImageTransform, img_num: int = 1) -> np.ndarray:
        if index not in self.decoded:
            self.decoded[index] = decode_image(self.record.images[index], record_id=self.record.id, index=index)
        return transform(self.decoded[index], img_num=img_num)


def _dropper(rng: np.random.Generator):
    """drop(p): one CFG dropout draw (only items that may be dropped reach it)."""
    return lambda p: p > 0 and rng.random() < p


def record_to_plan(record: Record, tokenizer, transforms: Transforms, model_cfg, rng: np.random.Generator,
                   cfg_dropout: CfgDropout = NO_DROPOUT, *, special_token_loss: bool = False) -> SamplePlan:
    """Build the docs/packed_sequence.md §4.2 sample plan of a validated record (see the module docstring for the
    per-task rules); a record with an explicit plan (`record.plan`) follows its items instead."""
    check_compatible(tokenizer, model_cfg)
    if record.plan is not None:
        return _explicit_plan(record, tokenizer, transforms, model_cfg, rng, cfg_dropout, special_token_loss)
    segments = record.segments
    understanding = record.task == "understanding"
    n_images = sum(seg.kind == "image" for seg in segments)
    img_num = n_images if understanding and n_images > 1 else 1  # multi-image VLM SFT shares max_pixels
    images = _Images(record)
    pixels = lambda index, transform: images(index, transform, img_num)  # noqa: E731
    drop = _dropper(rng)

    b = PlanBuilder(record.id, model_cfg)
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg.kind == "text":
            loss = seg.role == "answer"
            label = (tokenizer.start_of_image if special_token_loss and loss and not last
                     and segments[i + 1].kind == "image" else None)
            # Prompts of generative tasks are CFG conditions; answers and understanding texts never drop.
            dropped = (not understanding and not loss) and drop(cfg_dropout.text)
            b.text(tokenizer.encode(seg.text), segment=i, loss=loss, dropped=dropped, special_label=label)
        elif understanding:
            if seg.role == "target":
                raise ValueError(f"record {record.id!r}: segment {i} is a 'target' image in an understanding "
                                 f"record (targets need the generation or interleaved task)")
            b.vit_image(pixels(seg.image, transforms.vit), segment=i, dropped=False)
        else:
            if seg.role == "target":
                b.vae_image(pixels(seg.image, transforms.vae), segment=i, noised=True,
                            timestep=rng.standard_normal(), dropped=False)
                if last:
                    continue
            # Conditioning copies: clean VAE (shares the noised copy's rope id) then ViT.
            b.vae_image(pixels(seg.image, transforms.vae), segment=i, noised=False, timestep=-np.inf,
                        dropped=drop(cfg_dropout.vae))
            b.vit_image(pixels(seg.image, transforms.vit), segment=i, dropped=drop(cfg_dropout.vit))
    return b.build(record.task)


def plan_transforms(record: Record, transforms: Transforms, model_cfg) -> Transforms:
    """The planner's transforms with the record's explicit-plan overrides applied (strides checked)."""
    spec = record.plan
    if spec is None or (spec.vit_transform is None and spec.vae_transform is None):
        return transforms
    out = Transforms(vit=ImageTransform.from_config(spec.vit_transform) if spec.vit_transform else transforms.vit,
                     vae=ImageTransform.from_config(spec.vae_transform) if spec.vae_transform else transforms.vae)
    check_strides(out, model_cfg, f"record {record.id!r}")
    return out


def _explicit_plan(record: Record, tokenizer, transforms: Transforms, model_cfg, rng: np.random.Generator,
                   cfg_dropout: CfgDropout, special_token_loss: bool) -> SamplePlan:
    """The items of record.plan in order (docs/unimedvl_format.md "Explicit item plans"): a text item carries CE
    when its segment is an 'answer', a VAE item is the noised target when its segment is a 'target'; items with
    cfg may be dropped; an item with several segments uses one chosen uniformly from `rng`."""
    items = record.plan.items
    transforms = plan_transforms(record, transforms, model_cfg)
    n_vit = sum(item.use == "vit" for item in items)
    img_num = n_vit if n_vit > 1 else 1  # the ViT images of one sample share max_pixels, as the task path does
    images, drop = _Images(record), _dropper(rng)
    b = PlanBuilder(record.id, model_cfg)
    for k, item in enumerate(items):
        i = item.segments[0] if len(item.segments) == 1 else item.segments[int(rng.integers(len(item.segments)))]
        seg = record.segments[i]
        if item.use == "text":
            loss = seg.role == "answer"
            label = (tokenizer.start_of_image if special_token_loss and loss and k + 1 < len(items)
                     and items[k + 1].use != "text" else None)
            b.text(tokenizer.encode(seg.text), segment=i, loss=loss, dropped=item.cfg and drop(cfg_dropout.text),
                   special_label=label)
        elif item.use == "vit":
            b.vit_image(images(seg.image, transforms.vit, img_num), segment=i,
                        dropped=item.cfg and drop(cfg_dropout.vit))
        else:
            noised = seg.role == "target"
            b.vae_image(images(seg.image, transforms.vae), segment=i, noised=noised,
                        timestep=rng.standard_normal() if noised else -np.inf,
                        dropped=item.cfg and drop(cfg_dropout.vae))
    return b.build(record.task)


def check_strides(transforms: Transforms, model_cfg, where: str) -> None:
    """Raise ValueError (naming `where`) unless the strides fit the model's latent stride and ViT patch size."""
    stride = int(model_cfg.vae.downsample) * int(model_cfg.latent_patch_size)
    if transforms.vae.stride % stride:
        raise ValueError(f"{where}: VAE transform stride={transforms.vae.stride} must be a multiple of "
                         f"vae.downsample·latent_patch_size={stride}")
    if transforms.vit.stride % int(model_cfg.vit.patch_size):
        raise ValueError(f"{where}: ViT transform stride={transforms.vit.stride} must be a multiple of "
                         f"vit.patch_size={model_cfg.vit.patch_size}")


@dataclasses.dataclass(frozen=True)
class Planner:
    """record_to_plan bound to a tokenizer, transforms, model config, CFG dropout and special_token_loss."""

    tokenizer: object
    transforms: Transforms
    model_cfg: object
    cfg_dropout: CfgDropout = NO_DROPOUT
    special_token_loss: bool = False

    def __call__(self, record: Record, rng: np.random.Generator) -> SamplePlan:
        """The sample plan of `record`, drawing dropout and timesteps from `rng`."""
        return record_to_plan(record, self.tokenizer, self.transforms, self.model_cfg, rng, self.cfg_dropout,
                              special_token_loss=self.special_token_loss)

    @classmethod
    def from_config(cls, data_cfg, model_cfg, tokenizer) -> "Planner":
        """From data_cfg (vit_transform, vae_transform, cfg_dropout, special_token_loss) and the model config."""
        check_compatible(tokenizer, model_cfg)
        transforms = Transforms.from_config(data_cfg)
        check_strides(transforms, model_cfg, "data config (vit_transform / vae_transform)")
        return cls(tokenizer, transforms, model_cfg, CfgDropout.from_config(data_cfg["cfg_dropout"]),
                   bool(data_cfg.get("special_token_loss", False)))
