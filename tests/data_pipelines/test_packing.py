"""Record -> docs/packed_sequence.md §4.2 sample plan -> static-shape PackedBatch: rope rules, split modes, CE labels,
CFG dropout, every text / ViT / VAE token accounted for, budgets (next pack, oversize rejection), and a tiny-model
forward on a pack."""

import logging
import pickle

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_pipelines import schema
from data_pipelines.packing import Pack, PackBudgets, Packer
from data_pipelines.sample_plan import CfgDropout, Planner, Transforms, record_to_plan
from data_pipelines.transforms import ImageTransform, patchify_vit
from unimedvl_jax.models.unimedvl import UniMedVL, packed_loss
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE, PAD, TEXT, VAE, VIT, describe_shapes
from unimedvl_jax.tokenizers import SentencePieceTokenizer

MODEL = tiny.get_config().model
SIDE_VIT, SIDE_LAT = MODEL.vit_max_num_patch_per_side, MODEL.max_latent_size
LATENT_STRIDE = MODEL.vae.downsample * MODEL.latent_patch_size  # 16 pixels per latent token
ST = MODEL.special_tokens
CORPUS = ["What is the imaging modality?", "Chest X-ray with a right pleural effusion.",
          "Generate an axial CT slice of the liver.", "Make the lesion larger.", "Brain MRI, no acute findings."]
TRANSFORMS = Transforms(vit=ImageTransform(56, 28, 14), vae=ImageTransform(64, 32, 16))


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The proposed `data` config section with test-sized values."""
    c = ml_collections.ConfigDict(dict(
        max_tokens=256, und_capacity=256, gen_capacity=96, max_ce=64, max_vit_patches=64, max_vae_tokens=96,
        max_vae_images=4, vae_image_size=(64, 64),
        vit_transform=dict(max_size=56, min_size=28, stride=14, max_pixels=14 * 14 * 9 * 1024),
        vae_transform=dict(max_size=64, min_size=32, stride=16, max_pixels=14 * 14 * 9 * 1024),
        cfg_dropout=dict(text=0.0, vit=0.0, vae=0.0), special_token_loss=False))
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer.train(CORPUS * 10, vocab_size=MODEL.llm.vocab_size,
                                        special_ids=dict(MODEL.special_tokens))


def png(h, w, seed=0, gray=False):
    rng = np.random.default_rng(seed)
    return schema.encode_png(rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8))


def record(rid, task, segments, images):
    """segments: ('t', role, text) or ('i', role, image_index)."""
    segs = [schema.Segment("text", role, text=x) if k == "t" else schema.Segment("image", role, image=x)
            for k, role, x in segments]
    return schema.Record(id=rid, task=task, segments=segs, images=images, modality="CT", split="train",
                         source="synthetic", source_scan=f"scan-{rid}", license="CC0").validate()


def vqa(rid, question="What is the imaging modality?", answer="Chest X-ray.", size=(40, 56), seed=0):
    return record(rid, "understanding", [("i", "input", 0), ("t", "context", question), ("t", "answer", answer)],
                  [png(*size, seed=seed, gray=True)])


def t2i(rid, caption="Generate an axial CT slice of the liver.", size=(64, 48), seed=1):
    return record(rid, "generation", [("t", "context", caption), ("i", "target", 0)], [png(*size, seed=seed)])


def edit(rid, seed=2):
    """input, instruction, intermediate target, answer, final target."""
    return record(rid, "interleaved", [("i", "input", 0), ("t", "context", "Make the lesion larger."),
                                       ("i", "target", 1), ("t", "answer", "Lesion enlarged."), ("i", "target", 2)],
                  [png(48, 48, seed), png(32, 64, seed + 1, gray=True), png(64, 64, seed + 2)])


def plan(rec, tok, *, seed=0, dropout=None, **kw):
    return record_to_plan(rec, tok, TRANSFORMS, MODEL, np.random.default_rng(seed), dropout or CfgDropout(), **kw)


def split_spans(p):
    """[(mode, positions, kinds, text ids)] per local split of a plan."""
    return [(int(p.split_modes[s]), p.position_ids[p.split_index == s], p.token_kind[p.split_index == s],
             p.text_ids[p.split_index == s]) for s in range(len(p.split_modes))]


# --- sample plans (docs/packed_sequence.md §4.2) ----------------------------------------------------------------------

def test_understanding_plan(tok):
    rec = vqa("u1")
    p = plan(rec, tok)
    assert [i.kind for i in p.items] == ["vit", "text", "text"]
    img = TRANSFORMS.vit(schema.decode_image(rec.images[0], record_id="u1"))
    h, w = img.shape[0] // 14, img.shape[1] // 14
    (m0, pos0, k0, t0), (m1, pos1, k1, t1), (m2, pos2, k2, t2) = split_spans(p)
    assert m0 == FULL and np.all(pos0 == 0) and k0.tolist() == [TEXT] + [VIT] * (h * w) + [TEXT]
    assert t0[0] == ST.start_of_image and t0[-1] == ST.end_of_image
    q, a = tok.encode("What is the imaging modality?"), tok.encode("Chest X-ray.")
    assert m1 == CAUSAL and t1.tolist() == [ST.bos_token_id] + q + [ST.eos_token_id]
    assert pos1.tolist() == list(range(1, len(q) + 3))
    assert m2 == CAUSAL and pos2.tolist() == list(range(len(q) + 3, len(q) + 3 + len(a) + 2))
    # CE: [bos, a1..aL] -> [a1..aL, eos]; the im_end position carries no label (special_token_loss off).
    start = p.items[2].start
    assert p.ce_index.tolist() == list(range(start, start + len(a) + 1))
    assert p.ce_labels.tolist() == a + [ST.eos_token_id]
    np.testing.assert_array_equal(p.vit_patches, patchify_vit(img, 14))
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    assert p.vit_position_ids.tolist() == (r * SIDE_VIT + c).reshape(-1).tolist()
    assert p.vit_token_index.tolist() == list(range(1, 1 + h * w)) and not p.vae_images


def test_generation_plan_noised_target(tok):
    rec = t2i("g1")
    p = plan(rec, tok, seed=3)
    cap = tok.encode("Generate an axial CT slice of the liver.")
    (m0, pos0, _, _), (m1, pos1, k1, _) = split_spans(p)
    assert m0 == CAUSAL and pos0.tolist() == list(range(len(cap) + 2))
    assert m1 == NOISE and np.all(pos1 == len(cap) + 2)
    img = TRANSFORMS.vae(schema.decode_image(rec.images[0], record_id="g1"))
    h, w = img.shape[0] // LATENT_STRIDE, img.shape[1] // LATENT_STRIDE
    assert (k1 == VAE).sum() == h * w and p.ce_index.size == 0
    expected_n = np.random.default_rng(3).standard_normal()  # the only draw (no dropout configured)
    np.testing.assert_array_equal(p.vae_timestep, np.full(h * w, expected_n, np.float32))
    np.testing.assert_array_equal(p.vae_images[0], img)
    assert p.vae_token_row.tolist() == np.repeat(np.arange(h), w).tolist()
    assert p.vae_position_ids.tolist() == (p.vae_token_row * SIDE_LAT + p.vae_token_col).tolist()


def test_interleaved_order_and_rope_rules(tok):
    p = plan(edit("e1"), tok)
    got = [(i.kind, i.segment, i.noised, i.rope) for i in p.items]
    lc, la = len(tok.encode("Make the lesion larger.")) + 2, len(tok.encode("Lesion enlarged.")) + 2
    r1 = 2 + lc        # after input (clean VAE 0, ViT 1) and the instruction
    r2 = r1 + 2 + la   # noised target and its clean copy share r1, ViT copy r1+1, answer from r1+2
    assert got == [("vae", 0, False, 0), ("vit", 0, False, 1), ("text", 1, False, 2),
                   ("vae", 2, True, r1), ("vae", 2, False, r1), ("vit", 2, False, r1 + 1),
                   ("text", 3, False, r1 + 2), ("vae", 4, True, r2)]
    assert p.split_modes.tolist() == [FULL, FULL, CAUSAL, NOISE, FULL, FULL, CAUSAL, NOISE]
    for item in p.items:  # every token of an image (markers included) sits at the item's rope id
        if item.kind != "text":
            assert np.all(p.position_ids[item.start:item.start + item.length] == item.rope)
    # The noised target and its clean copy come from the same pixels; only the noised one has a finite t.
    np.testing.assert_array_equal(p.vae_images[1], p.vae_images[2])
    t_by_image = {int(i): p.vae_timestep[p.vae_token_image == i] for i in range(len(p.vae_images))}
    assert [bool(np.isfinite(t).all()) for t in t_by_image.values()] == [False, True, False, True]
    assert p.items[6].loss and p.ce_labels.tolist() == tok.encode("Lesion enlarged.") + [ST.eos_token_id]


def test_cfg_dropout_rope_rules(tok):
    """All conditions dropped: dropped ViT/VAE still advance rope, a dropped text does not; targets and answers
    never drop."""
    p = plan(edit("e2"), tok, dropout=CfgDropout(text=1.0, vit=1.0, vae=1.0))
    got = [(i.kind, i.dropped, i.rope) for i in p.items]
    la = len(tok.encode("Lesion enlarged.")) + 2
    assert got == [("vae", True, 0), ("vit", True, 1), ("text", True, 2), ("vae", False, 2), ("vae", True, 2),
                   ("vit", True, 3), ("text", False, 4), ("vae", False, 4 + la)]
    assert p.split_modes.tolist() == [NOISE, CAUSAL, NOISE] and len(p.vae_images) == 2 and p.vit_patches.size == 0
    # Understanding samples never drop (VLM-SFT items have enable_cfg = 0).
    u = plan(vqa("u2"), tok, dropout=CfgDropout(1.0, 1.0, 1.0))
    assert not any(i.dropped for i in u.items)


def test_cfg_dropout_is_random_and_seeded(tok):
    rec, drop = t2i("g2", size=(32, 32)), CfgDropout(text=0.5)
    dropped = [plan(rec, tok, seed=s, dropout=drop).items[0].dropped for s in range(200)]
    assert 70 < sum(dropped) < 130
    assert [plan(rec, tok, seed=s, dropout=drop).items[0].dropped for s in range(20)] == dropped[:20]


def test_special_token_loss_labels_im_end(tok):
    rec = record("s1", "interleaved", [("i", "input", 0), ("t", "answer", "Lesion enlarged."), ("i", "target", 0)],
                 [png(32, 32)])
    off, on = plan(rec, tok), plan(rec, tok, special_token_loss=True)
    item = on.items[2]
    assert on.ce_index.tolist() == off.ce_index.tolist() + [item.start + item.length - 1]
    assert on.ce_labels.tolist() == off.ce_labels.tolist() + [ST.start_of_image]


def test_plan_errors_name_the_record(tok):
    bad = record("bad-1", "understanding", [("i", "target", 0), ("t", "answer", "x")], [png(32, 32)])
    with pytest.raises(ValueError, match="bad-1"):
        plan(bad, tok)
    big_vit = Transforms(vit=ImageTransform(280, 28, 14), vae=TRANSFORMS.vae)  # 20 patches > 16-wide table
    with pytest.raises(ValueError, match="big-1.*16x16"):
        record_to_plan(vqa("big-1", size=(280, 280)), tok, big_vit, MODEL, np.random.default_rng(0))


# --- packing (docs/packed_sequence.md §4.3–4.5) -----------------------------------------------------------------------

def expected_text_tokens(rec, tok):
    """TEXT-kind ids of a record's sample without dropout, derived from the record alone."""
    soi_eoi = [ST.start_of_image, ST.end_of_image]
    out = []
    for i, seg in enumerate(rec.segments):
        if seg.kind == "text":
            out += [ST.bos_token_id] + tok.encode(seg.text) + [ST.eos_token_id]
        elif rec.task == "understanding":
            out += soi_eoi
        elif seg.role == "target" and i == len(rec.segments) - 1:
            out += soi_eoi
        else:  # (noised target +) clean VAE + ViT copies
            out += soi_eoi * (3 if seg.role == "target" else 2)
    return out


def corpus():
    recs = [vqa(f"u{i}", answer="Chest X-ray with a right pleural effusion. " * (1 + i % 3),
                size=(28 + 12 * i, 60 - 4 * i), seed=i) for i in range(5)]
    recs += [t2i(f"g{i}", size=(32 + 16 * (i % 3), 64), seed=10 + i) for i in range(4)]
    recs += [edit(f"e{i}", seed=20 + 3 * i) for i in range(2)]
    order = np.random.default_rng(0).permutation(len(recs))
    return [recs[i] for i in order]


def check_pack(pack: Pack, plans: dict, budgets: PackBudgets):
    """Every docs/packed_sequence.md §4 invariant of one pack against the plans of its records."""
    b, t = pack.batch, budgets.max_tokens
    kind, n = b.token_kind, pack.num_real_tokens
    n_samples = len(pack.record_ids)
    # Samples laid out in order, then one causal PAD sample with its own sample and split id.
    assert b.sample_id[:n].tolist() == np.repeat(np.arange(n_samples), pack.sample_tokens).tolist()
    assert np.all(kind[n:] == PAD) and np.all(kind[:n] != PAD)
    assert np.all(b.sample_id[n:] == n_samples) and np.all(b.split_mode[n:] == CAUSAL)
    assert np.all(b.split_id[n:] == b.split_id[n - 1] + 1) and np.all(b.position_ids[n:] == 0)
    assert np.all(np.diff(b.split_id[:n]) >= 0) and np.all(np.diff(b.split_id[:n]) <= 1)
    for s in np.unique(b.split_id):
        assert len(np.unique(b.split_mode[b.split_id == s])) == 1
    # Per sample: tokens, positions and modes are the plan's.
    offset, vit_rows, images = 0, [], []
    for rid in pack.record_ids:
        p = plans[rid]
        sl = slice(offset, offset + p.num_tokens)
        assert b.text_ids[sl].tolist() == p.text_ids.tolist() and kind[sl].tolist() == p.token_kind.tolist()
        assert b.position_ids[sl].tolist() == p.position_ids.tolist()
        assert b.split_mode[sl].tolist() == p.split_modes[p.split_index].tolist()
        vit_rows.append(p.vit_patches)
        images += p.vae_images
        offset += p.num_tokens
    # MoT routing buffers: exactly the und (text + ViT) and gen (VAE) positions, padded with T.
    und, gen = np.nonzero((kind == TEXT) | (kind == VIT))[0], np.nonzero(kind == VAE)[0]
    assert b.und_index.tolist() == und.tolist() + [t] * (budgets.und_capacity - len(und))
    assert b.gen_index.tolist() == gen.tolist() + [t] * (budgets.gen_capacity - len(gen))
    # ViT: every VIT token exactly once, patches in order, padding patches in their own image.
    n_vit = int((kind == VIT).sum())
    assert b.vit_token_index[:n_vit].tolist() == np.nonzero(kind == VIT)[0].tolist()
    assert np.all(b.vit_token_index[n_vit:] == t)
    np.testing.assert_array_equal(b.vit_patches[:n_vit], np.concatenate(vit_rows))
    assert np.all(b.vit_patches[n_vit:] == 0)
    real_ids = b.vit_image_id[:n_vit]
    assert np.all(np.diff(real_ids) >= 0) and np.all(b.vit_image_id[n_vit:] == (real_ids.max() + 1 if n_vit else 0))
    # VAE: every VAE token exactly once; t finite exactly in noise splits; grids inside their images.
    n_vae = int((kind == VAE).sum())
    assert b.vae_token_index[:n_vae].tolist() == gen.tolist() and np.all(b.vae_token_index[n_vae:] == t)
    noised = b.split_mode[gen] == NOISE
    assert np.all(np.isfinite(b.vae_timestep[:n_vae]) == noised) and np.all(b.vae_timestep[n_vae:] == -np.inf)
    for img_id, img in enumerate(images):
        sel = b.vae_token_image[:n_vae] == img_id
        h, w = img.shape[0] // LATENT_STRIDE, img.shape[1] // LATENT_STRIDE
        assert sel.sum() == h * w
        assert b.vae_token_row[:n_vae][sel].tolist() == np.repeat(np.arange(h), w).tolist()
        assert b.vae_token_col[:n_vae][sel].tolist() == np.tile(np.arange(w), h).tolist()
        # zero padding bottom/right (docs/packed_sequence.md §4.4)
        np.testing.assert_array_equal(b.vae_images[img_id, :img.shape[0], :img.shape[1]], img)
        assert not b.vae_images[img_id, img.shape[0]:].any() and not b.vae_images[img_id, :, img.shape[1]:].any()
    assert not b.vae_images[len(images):].any()
    assert b.vae_position_ids.tolist() == (b.vae_token_row * SIDE_LAT + b.vae_token_col).tolist()
    # CE: labels are the next tokens, at causal text positions, weight 1; padding slots point at T, weight 0.
    n_ce = int((b.ce_index < t).sum())
    ce = b.ce_index[:n_ce]
    assert np.all(kind[ce] == TEXT) and np.all(b.split_mode[ce] == CAUSAL)
    assert b.ce_labels[:n_ce].tolist() == b.text_ids[ce + 1].tolist()
    assert np.all(b.ce_weight[:n_ce] == 1) and np.all(b.ce_weight[n_ce:] == 0) and np.all(b.ce_index[n_ce:] == t)
    assert pack.usage["max_ce"] == n_ce and pack.usage["max_tokens"] == n


def test_packing_invariants(tok):
    cfg = data_config()
    planner, packer = Planner.from_config(cfg, MODEL, tok), Packer.from_config(cfg, MODEL)
    recs = corpus()
    rng = np.random.default_rng(0)
    plans = {r.id: planner(r, rng) for r in recs}
    packs = list(packer.pack_all(plans[r.id] for r in recs))
    assert len(packs) >= 3 and packer.stats.rejected == 0 and packer.stats.packs == len(packs)
    # Every record in exactly one pack, in arrival order.
    assert [rid for p in packs for rid in p.record_ids] == [r.id for r in recs]
    shapes = {tuple(sorted(describe_shapes(p.batch).items())) for p in packs}
    assert len(shapes) == 1  # one compiled step serves every pack
    for p in packs:
        check_pack(p, plans, packer.budgets)
    # No text token lost: the TEXT ids of each record's sample are exactly what its segments tokenize to.
    by_id = {r.id: r for r in recs}
    for p in packs:
        for s, rid in enumerate(p.record_ids):
            mine = (p.batch.sample_id == s) & (p.batch.token_kind == TEXT)
            assert p.batch.text_ids[mine].tolist() == expected_text_tokens(by_id[rid], tok)


def test_sample_that_does_not_fit_goes_to_next_pack(tok):
    plans = [plan(t2i(f"g{i}", size=(64, 64)), tok) for i in range(3)]  # 16 latent tokens each
    budgets = PackBudgets(max_tokens=256, und_capacity=256, gen_capacity=40, max_ce=8, max_vit_patches=8,
                          max_vae_tokens=40, max_vae_images=4, vae_image_size=(64, 64))
    packer = Packer(budgets, vit_patch_dim=588)
    assert packer.add(plans[0]) == [] and packer.add(plans[1]) == []
    (first,) = packer.add(plans[2])  # 48 VAE tokens > 40: closes the open pack
    assert first.record_ids == ["g0", "g1"]
    (second,) = packer.flush()
    assert second.record_ids == ["g2"] and packer.flush() == []
    assert packer.stats.samples == 3 and packer.stats.packs == 2 and packer.stats.rejected == 0
    for p in (first, second):
        check_pack(p, {q.record_id: q for q in plans}, budgets)


def test_oversize_sample_rejected_and_counted(tok, caplog):
    packer = Packer.from_config(data_config(max_tokens=64, und_capacity=64, vae_image_size=(64, 32)), MODEL)
    long = plan(vqa("too-long", answer="Chest X-ray with a right pleural effusion. " * 12), tok)
    small = plan(vqa("fits"), tok)
    wide = plan(t2i("too-wide", size=(64, 64)), tok)  # 64x64 pixels > the 64x32 padded VAE image
    with caplog.at_level(logging.WARNING, logger="data_pipelines.packing"):
        assert packer.add(long) == [] and packer.add(small) == [] and packer.add(wide) == []
    assert packer.stats.rejected == 2 and packer.stats.samples == 1
    assert packer.stats.rejected_by_budget["max_tokens"] == 1
    assert packer.stats.rejected_by_budget["vae_image_size"] == 1
    assert "'too-long'" in caplog.text and "max_tokens" in caplog.text
    assert "'too-wide'" in caplog.text and "vae_image_size" in caplog.text
    (pack,) = packer.flush()
    assert pack.record_ids == ["fits"]


def test_planner_and_packer_pickle(tok):
    """Both run inside grain worker processes."""
    cfg = data_config()
    planner, packer = Planner.from_config(cfg, MODEL, tok), Packer.from_config(cfg, MODEL)
    rec = t2i("p1")
    packer.add(planner(rec, np.random.default_rng(0)))
    planner2, packer2 = pickle.loads(pickle.dumps(planner)), pickle.loads(pickle.dumps(packer))
    p = planner2(rec, np.random.default_rng(0))
    np.testing.assert_array_equal(p.text_ids, planner(rec, np.random.default_rng(0)).text_ids)
    packer2.add(p)
    (pack,) = packer2.flush()
    assert pack.record_ids == ["p1", "p1"] and packer.stats.samples == 1


def test_budgets_from_config():
    b = PackBudgets.from_config(data_config())
    assert b.max_tokens == 256 and b.vae_image_size == (64, 64)
    with pytest.raises(ValueError, match="max_vae_images"):
        PackBudgets.from_config(data_config(max_vae_images=0))


# --- end to end: a pack through the tiny model -------------------------------------------------------------------

def test_tiny_model_forward_on_pack(tok):
    cfg = data_config(max_tokens=128, und_capacity=128, gen_capacity=32, max_ce=32, max_vit_patches=16,
                      max_vae_tokens=32, max_vae_images=2)
    planner, packer = Planner.from_config(cfg, MODEL, tok), Packer.from_config(cfg, MODEL)
    recs = [vqa("u-e2e", size=(28, 42)), t2i("g-e2e", size=(32, 48))]
    plans = [planner(r, np.random.default_rng(5)) for r in recs]
    (pack,) = list(packer.pack_all(plans))
    assert pack.record_ids == ["u-e2e", "g-e2e"]
    model = UniMedVL(MODEL, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jax.numpy.asarray, pack.batch)

    @nnx.jit
    def step(model, batch, key):
        k_vae, k_noise = jax.random.split(key)
        latents = model.vae_model.encode(batch.vae_images, key=k_vae)
        p, z = MODEL.latent_patch_size, MODEL.vae.z_channels
        noise = jax.random.normal(k_noise, (batch.vae_timestep.shape[0], p * p * z))
        out = model(batch, latents, noise)
        return out, packed_loss(out, batch.ce_weight)

    out, (loss, terms) = step(model, batch, jax.random.key(0))
    n_answer = len(tok.encode("Chest X-ray.")) + 1  # answer ids + the im_end label
    assert int(out.ce_mask.sum()) == int(terms["n_ce"]) == n_answer
    assert int(terms["n_mse"]) == int(np.isfinite(pack.batch.vae_timestep).sum()) == 6  # 32x48 -> 2x3 tokens
    assert np.isfinite(float(terms["ce"])) and np.isfinite(float(terms["mse"])) and np.isfinite(float(loss))
    assert float(terms["ce"]) > 0 and float(terms["mse"]) > 0
