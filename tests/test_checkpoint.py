"""load_official_checkpoint on state dicts written with the authors' key names and shapes (SPEC.md layout)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug import MPLUG, MPLUGConfig, load_official_checkpoint
from mplug.model.checkpoint import resize_positional_embedding
from mplug.tasks.classification import fused_cls
from mplug.tasks.grounding import _coordinate_logits, _fused_memory, grounding_tokens


def linear_keys(prefix, out_features, in_features):
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def norm_keys(prefix, width):
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def bert_layer_keys(prefix, c, cross: bool):
    h, i = c.hidden_size, c.intermediate_size
    keys = {}
    for block in ("attention", "crossattention") if cross else ("attention",):
        for name in ("query", "key", "value"):
            keys.update(linear_keys(f"{prefix}.{block}.self.{name}", h, h))
        keys.update(linear_keys(f"{prefix}.{block}.output.dense", h, h))
        keys.update(norm_keys(f"{prefix}.{block}.output.LayerNorm", h))
    keys.update(linear_keys(f"{prefix}.intermediate.dense", i, h))
    keys.update(linear_keys(f"{prefix}.output.dense", h, i))
    keys.update(norm_keys(f"{prefix}.output.LayerNorm", h))
    return keys


def embedding_keys(prefix, c):
    h = c.hidden_size
    keys = {
        f"{prefix}.word_embeddings.weight": (c.vocab_size, h),
        f"{prefix}.position_embeddings.weight": (c.max_position_embeddings, h),
        f"{prefix}.token_type_embeddings.weight": (2, h),
    }
    keys.update(norm_keys(f"{prefix}.LayerNorm", h))
    return keys


def prediction_keys(prefix, c):
    keys = {f"{prefix}.bias": (c.vocab_size,), f"{prefix}.decoder.weight": (c.vocab_size, c.hidden_size)}
    keys.update(linear_keys(f"{prefix}.transform.dense", c.hidden_size, c.hidden_size))
    keys.update(norm_keys(f"{prefix}.transform.LayerNorm", c.hidden_size))
    return keys


def official_layout(c: MPLUGConfig, pretrained: bool):
    """(official key -> shape, official key -> our key or None when it must be skipped), per SPEC.md."""
    w, h = c.vision_width, c.hidden_size
    shapes, ours = {}, {}

    def add(keys, rename=lambda key: key):
        shapes.update(keys)
        ours.update({key: rename(key) for key in keys})

    visual = "visual_encoder.visual"
    add({f"{visual}.class_embedding": (w,), f"{visual}.positional_embedding": (c.num_visual_tokens, w),
         f"{visual}.conv1.weight": (w, 3, c.patch_size, c.patch_size)})
    add(norm_keys(f"{visual}.ln_pre", w))
    add(norm_keys(f"{visual}.ln_post", w))
    for n in range(c.vision_layers):
        block = f"{visual}.transformer.resblocks.{n}"
        add({f"{block}.attn.in_proj_weight": (3 * w, w), f"{block}.attn.in_proj_bias": (3 * w,)})
        add(linear_keys(f"{block}.attn.out_proj", w, w))
        add(linear_keys(f"{block}.mlp.c_fc", 4 * w, w))
        add(linear_keys(f"{block}.mlp.c_proj", w, 4 * w))
        add(norm_keys(f"{block}.ln_1", w))
        add(norm_keys(f"{block}.ln_2", w))
    add(linear_keys("visn_fc", h, w), lambda key: "visual_encoder." + key)
    add(norm_keys("visn_layer_norm", h), lambda key: "visual_encoder." + key)

    text = "text_encoder.bert" if pretrained else "text_encoder"
    strip_bert = lambda key: key.replace("text_encoder.bert.", "text_encoder.")
    add(embedding_keys(f"{text}.embeddings", c), strip_bert)
    for n in range(c.text_layers):
        add(bert_layer_keys(f"{text}.encoder.layer.{n}", c, cross=False), strip_bert)
    if pretrained:
        add(prediction_keys("text_encoder.cls.predictions", c), mlm_head_key)

    fusion = "fusion_encoder.fusion" if pretrained else "fusion_encoder"
    for n in range(c.text_layers + c.fusion_layers):
        k = n - c.text_layers

        def fused(key, k=k):
            if k < 0 or (c.is_connected_layer(k) and ".crossattention." in key):
                return None
            return key.replace(f"{fusion}.encoder.layer.{n}.", f"fusion_encoder.encoder.layer.{k}.")

        add(bert_layer_keys(f"{fusion}.encoder.layer.{n}", c, cross=True), fused)

    add(embedding_keys("text_decoder.bert.embeddings", c))
    for n in range(c.decoder_layers):
        add(bert_layer_keys(f"text_decoder.bert.encoder.layer.{n}", c, cross=True))
    add(prediction_keys("text_decoder.cls.predictions", c))
    add({"text_decoder.cls.predictions.decoder.bias": (c.vocab_size,)}, lambda key: None)

    add(linear_keys("vision_proj", c.embed_dim, h))
    add(linear_keys("text_proj", c.embed_dim, h))
    add(linear_keys("itm_head", 2, h))
    add({"temp": ()})
    skipped = {
        "image_queue": (c.embed_dim, 4096), "text_queue": (c.embed_dim, 4096), "queue_ptr": (1,),
        "vision_proj_m.weight": (c.embed_dim, h), "text_encoder_m.embeddings.word_embeddings.weight": (c.vocab_size, h),
        "visual_encoder_m.visual.class_embedding": (w,),
    }
    add(skipped, lambda key: None)
    return shapes, ours


def mlm_head_key(key):
    """Our name for an MLM-head key of either layout; the decoder weight is ours tied to the text embeddings (skipped)."""
    if key.endswith(".decoder.weight") or key.endswith(".decoder.bias"):
        return None
    return "mlm_head." + key.split(".cls.predictions.")[1]


def clip_keys(c, head):
    """The authors' whole CLIP under ``head``: the ViT (ours), its image projection and the text tower (both unused)."""
    w, tower = c.vision_width, 32
    keys = {f"{head}.visual.class_embedding": (w,), f"{head}.visual.positional_embedding": (c.num_visual_tokens, w),
            f"{head}.visual.conv1.weight": (w, 3, c.patch_size, c.patch_size), f"{head}.visual.proj": (w, 24)}
    keys.update(norm_keys(f"{head}.visual.ln_pre", w))
    keys.update(norm_keys(f"{head}.visual.ln_post", w))
    for width, blocks in ((w, f"{head}.visual.transformer"), (tower, f"{head}.transformer")):
        for n in range(2):
            block = f"{blocks}.resblocks.{n}"
            keys.update({f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,)})
            keys.update(linear_keys(f"{block}.attn.out_proj", width, width))
            keys.update(linear_keys(f"{block}.mlp.c_fc", 4 * width, width))
            keys.update(linear_keys(f"{block}.mlp.c_proj", width, 4 * width))
            keys.update(norm_keys(f"{block}.ln_1", width))
            keys.update(norm_keys(f"{block}.ln_2", width))
    keys.update({f"{head}.token_embedding.weight": (100, tower), f"{head}.positional_embedding": (77, tower),
                 f"{head}.text_projection": (tower, 24), f"{head}.logit_scale": ()})
    keys.update(norm_keys(f"{head}.ln_final", tower))
    return keys


def clip_key(key):
    """Our name for a CLIP key (``head`` = visual_encoder[_m]): the ViT kept, the rest skipped."""
    head, _, rest = key.partition(".")
    return None if not rest.startswith("visual.") or rest == "visual.proj" else key


def authors_layout(c: MPLUGConfig, layout: str, momentum: bool, mlm_head: str = "fusion_encoder"):
    """(key -> shape, key -> our key or None) of the authors' files, from their module names: layout "pretrained"
    (BertForMaskedLM text and fusion encoders under ``bert.``, the MLM head under ``mlm_head``.cls, whole CLIP,
    queues) or the fine-tuned "vqa", "caption", "retrieval", "grounding" (with vision_proj/text_proj and the token-id
    buffers), "ve", "nlvr" (classifier ``cls_head`` = Linear, ReLU, Linear, as mplug/model/checkpoint.py assumes);
    momentum adds every module's ``_m`` copy (ours has no classifier-head copies: those are ignored)."""
    h = c.hidden_size
    bert = "bert." if layout == "pretrained" else ""
    parts = {
        "visual_encoder": (clip_keys(c, "visual_encoder"), clip_key),
        "visn": ({**linear_keys("visn_fc", h, c.vision_width), **norm_keys("visn_layer_norm", h)}, lambda key: "visual_encoder." + key),
        "text_encoder": ({}, lambda key: key.replace("text_encoder.bert.", "text_encoder.")),
        "fusion_encoder": ({}, None),
        "text_decoder": ({}, lambda key: None if key.endswith("predictions.decoder.bias") else key),
        "vision_proj": (linear_keys("vision_proj", c.embed_dim, h), lambda key: key),
        "text_proj": (linear_keys("text_proj", c.embed_dim, h), lambda key: key),
        "itm_head": (linear_keys("itm_head", 2, h), lambda key: key),
        "buffers": ({"prefix_ids": (1,), "target_ids": (c.image_size + 1,), "bbox_prob_mask": (c.vocab_size,)}, lambda key: None),
    }
    if layout in ("ve", "nlvr"):
        width, classes, ours_head = (h, 3, "ve_head") if layout == "ve" else (2 * h, 2, "nlvr_head")
        head_keys = {**linear_keys("cls_head.0", width, width), **linear_keys("cls_head.2", classes, width)}
        parts["cls_head"] = (head_keys, lambda key: ours_head + key[len("cls_head"):])
    parts["text_encoder"][0].update(embedding_keys(f"text_encoder.{bert}embeddings", c))
    for n in range(c.text_layers):
        parts["text_encoder"][0].update(bert_layer_keys(f"text_encoder.{bert}encoder.layer.{n}", c, cross=False))
    fusion = parts["fusion_encoder"][0]
    if layout == "pretrained":
        fusion.update(embedding_keys("fusion_encoder.bert.embeddings", c))
    for n in range(c.text_layers + c.fusion_layers):
        fusion.update(bert_layer_keys(f"fusion_encoder.{bert}encoder.layer.{n}", c, cross=True))

    def fused(key):
        head, _, rest = key.partition(".")
        rest = rest.removeprefix("bert.")
        if rest.startswith("embeddings."):
            return None
        n, tail = rest.removeprefix("encoder.layer.").split(".", 1)
        k = int(n) - c.text_layers
        if k < 0 or (c.is_connected_layer(k) and tail.startswith("crossattention.")):
            return None
        return f"{head}.encoder.layer.{k}.{tail}"

    parts["fusion_encoder"] = (fusion, fused)
    decoder = parts["text_decoder"][0]
    decoder.update(embedding_keys("text_decoder.bert.embeddings", c))
    for n in range(c.decoder_layers):
        decoder.update(bert_layer_keys(f"text_decoder.bert.encoder.layer.{n}", c, cross=True))
    decoder.update(prediction_keys("text_decoder.cls.predictions", c))
    decoder["text_decoder.cls.predictions.decoder.bias"] = (c.vocab_size,)
    if layout == "pretrained":
        head = prediction_keys(f"{mlm_head}.cls.predictions", c)
        head[f"{mlm_head}.cls.predictions.decoder.bias"] = (c.vocab_size,)
        parts[mlm_head] = ({**parts[mlm_head][0], **head}, lambda key, rename=parts[mlm_head][1]: mlm_head_key(key) if ".cls." in key else rename(key))
    kept = {
        "pretrained": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"),
        "vqa": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "text_decoder"),
        "caption": ("visual_encoder", "visn", "text_decoder"),
        "retrieval": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "itm_head"),
        "grounding": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "text_decoder", "vision_proj", "text_proj", "buffers"),
        "ve": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "cls_head"),
        "nlvr": ("visual_encoder", "visn", "text_encoder", "fusion_encoder", "cls_head"),
    }[layout]
    shapes, ours = {}, {}
    for name in kept:
        keys, rename = parts[name]
        shapes.update(keys)
        ours.update({key: rename(key) for key in keys})
        if momentum and name not in ("itm_head", "buffers"):
            momentum_key = lambda key: "{0}_m.{2}".format(*key.partition("."))
            for key in keys:
                mapped = rename(key)
                shapes[momentum_key(key)] = keys[key]
                ours[momentum_key(key)] = None if mapped is None or name == "cls_head" else momentum_key(mapped)
    if layout in ("pretrained", "retrieval"):
        shapes["temp"], ours["temp"] = (), "temp"
        queues = {"image_queue": (c.embed_dim, 16), "text_queue": (c.embed_dim, 16), "queue_ptr": (1,)}
        if layout == "retrieval":
            queues["idx_queue"] = (1, 16)
        shapes.update(queues)
        ours.update(dict.fromkeys(queues))
    return shapes, ours


def random_state(shapes, seed=0):
    """Random tensors of ``shapes``; tied heads equal their embeddings, queue pointers are long."""
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    for key in state:
        if key.endswith("predictions.decoder.weight"):
            state[key] = state[key.split(".cls.")[0] + ".bert.embeddings.word_embeddings.weight"]
        if key.endswith(("queue_ptr", "idx_queue")):
            state[key] = torch.zeros(shapes[key], dtype=torch.long)
    return state


def official_state_dict(c: MPLUGConfig, pretrained: bool = False, seed: int = 0):
    """A random state dict with the official keys; tied LM-head weights equal their embeddings, as the authors save them."""
    generator = torch.Generator().manual_seed(seed)
    shapes, ours = official_layout(c, pretrained)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    if pretrained:
        text = "text_encoder.bert.embeddings.word_embeddings.weight"
        state["text_encoder.cls.predictions.decoder.weight"] = state[text]
    return state, ours


@pytest.mark.parametrize("mlm_head", ["fusion_encoder", "text_encoder"])
@pytest.mark.parametrize("copies", [True, False], ids=["with_momentum_copies", "without"])
def test_authors_complete_pretrained_file_loads_strictly(mlm_head, copies):
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    if copies:
        model.add_momentum_copies()
    shapes, ours = authors_layout(config, "pretrained", momentum=True, mlm_head=mlm_head)
    if not copies:
        ours = {key: None if key.split(".")[0].endswith("_m") else mapped for key, mapped in ours.items()}
    state = random_state(shapes)
    result = load_official_checkpoint(model, state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sorted(result.ignored_keys) == sorted(key for key, mapped in ours.items() if mapped is None)
    assert_loaded(model, state, ours)
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    filled = {mapped for mapped in ours.values() if mapped is not None}
    tied = {key for key in model.state_dict() if key.endswith("predictions.decoder.weight") or "mlm_head" in key and "decoder" in key}
    assert set(model.state_dict()) - filled - tied == {"image_queue", "text_queue", "idx_queue", "queue_ptr"}


@pytest.mark.parametrize("layout", ["vqa", "caption", "retrieval"])
@pytest.mark.parametrize("momentum", [True, False], ids=["distilled", "plain"])
def test_authors_finetuned_files_load_strictly_for_their_task(layout, momentum):
    config = MPLUGConfig.tiny()
    model = MPLUG(config).add_momentum_copies()
    untouched = {key: value.clone() for key, value in model.state_dict().items()}
    shapes, ours = authors_layout(config, layout, momentum)
    state = random_state(shapes, seed=1)
    result = load_official_checkpoint(model, state, strict=True, task=layout)
    assert result.unexpected_keys == [] and result.missing_keys == []
    assert_loaded(model, state, ours)
    loaded = model.state_dict()
    filled = {mapped for mapped in ours.values() if mapped is not None}
    for key, value in loaded.items():
        head, _, rest = key.partition(".")
        if key in filled or key.endswith("predictions.decoder.weight") or key.startswith(("mlm_head.decoder", "mlm_head_m.decoder")):
            continue  # loaded, or a tied alias of a loaded embedding
        if head.endswith("_m"):  # momentum weights the file lacks follow the loaded online ones
            torch.testing.assert_close(value, loaded[f"{head[:-2]}.{rest}"], atol=0, rtol=0)
        else:
            assert torch.equal(value, untouched[key]), key
    with pytest.raises(RuntimeError, match="missing keys"):
        load_official_checkpoint(MPLUG(config), state, strict=True, task="vqa" if layout != "vqa" else None)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task must be None or one of"):
        load_official_checkpoint(MPLUG(MPLUGConfig.tiny()), {}, task="segmentation")


def assert_loaded(model, state, ours):
    loaded = model.state_dict()
    for official, key in ours.items():
        if key is not None:
            torch.testing.assert_close(loaded[key], state[official].to(loaded[key].dtype), atol=0, rtol=0, msg=lambda m: f"{official} -> {key}: {m}")


@pytest.mark.parametrize("pretrained", [False, True], ids=["finetuned", "pretrained"])
@pytest.mark.parametrize("wrapper", ["model", "module", "bare"])
def test_official_layout_loads_every_parameter(pretrained, wrapper):
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    state, ours = official_state_dict(config, pretrained)
    checkpoint = state if wrapper == "bare" else {wrapper: state, "epoch": 3}
    result = load_official_checkpoint(model, checkpoint, strict=pretrained)
    assert result.unexpected_keys == []
    expected_missing = [] if pretrained else ["mlm_head.bias", "mlm_head.transform.dense.weight",
                                               "mlm_head.transform.dense.bias", "mlm_head.transform.LayerNorm.weight",
                                               "mlm_head.transform.LayerNorm.bias"]
    assert sorted(result.missing_keys) == sorted(expected_missing)
    assert sorted(result.ignored_keys) == sorted(key for key, mapped in ours.items() if mapped is None)
    assert_loaded(model, state, ours)
    covered = {key for key in ours.values() if key is not None}
    tied = {"text_decoder.cls.predictions.decoder.weight", "mlm_head.decoder.weight"}
    assert set(model.state_dict()) - covered - tied - {"image_queue", "text_queue", "idx_queue", "queue_ptr"} == set(expected_missing)


def test_tied_heads_follow_their_embeddings():
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    state, _ = official_state_dict(config, pretrained=True)
    load_official_checkpoint(model, state)
    decoder_embeddings = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.decoder.weight is decoder_embeddings
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    torch.testing.assert_close(decoder_embeddings.detach(), state["text_decoder.bert.embeddings.word_embeddings.weight"])


def test_loads_from_a_path_with_module_prefix(tmp_path):
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    state, ours = official_state_dict(config)
    path = tmp_path / "mplug_tiny.pth"
    torch.save({"model": {"module." + key: value for key, value in state.items()}}, path)
    result = load_official_checkpoint(model, str(path))
    assert result.unexpected_keys == []
    assert_loaded(model, state, ours)


def test_positional_embedding_resized_to_configured_image_size():
    config = MPLUGConfig.tiny(image_size=48)  # 6 x 6 grid; the checkpoint has 4 x 4 (image 32)
    model = MPLUG(config)
    state, _ = official_state_dict(MPLUGConfig.tiny())
    key = "visual_encoder.visual.positional_embedding"
    result = load_official_checkpoint(model, state)
    assert key not in result.missing_keys
    loaded = model.visual_encoder.visual.positional_embedding.detach()
    assert loaded.shape == (37, config.vision_width)
    torch.testing.assert_close(loaded[0], state[key][0], atol=0, rtol=0)
    grid = state[key][1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(36, -1)
    torch.testing.assert_close(loaded[1:], expected)


def test_resize_keeps_constant_grid_and_class_row():
    positions = torch.cat([torch.full((1, 8), -3.0), torch.full((16, 8), 2.5)])
    resized = resize_positional_embedding(positions, 1 + 49)
    assert resized.shape == (50, 8)
    assert torch.equal(resized[0], positions[0])
    torch.testing.assert_close(resized[1:], torch.full((49, 8), 2.5))
    with pytest.raises(ValueError, match="square"):
        resize_positional_embedding(positions, 1 + 50)


def test_wrong_shapes_name_the_offending_keys():
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    state, _ = official_state_dict(config)
    state["text_encoder.encoder.layer.1.intermediate.dense.weight"] = torch.randn(7, config.hidden_size)
    state["itm_head.weight"] = torch.randn(3, config.hidden_size)
    with pytest.raises(ValueError) as error:
        load_official_checkpoint(model, state)
    message = str(error.value)
    assert "text_encoder.encoder.layer.1.intermediate.dense.weight" in message and "(7, 64)" in message
    assert "itm_head.weight" in message and "(3, 64)" in message and "(2, 64)" in message


def test_strict_raises_on_missing_and_unexpected_keys():
    config = MPLUGConfig.tiny()
    state, _ = official_state_dict(config, pretrained=True)
    del state["itm_head.bias"]
    result = load_official_checkpoint(MPLUG(config), dict(state, **{"some_new_head.weight": torch.zeros(2)}))
    assert result.missing_keys == ["itm_head.bias"]
    assert result.unexpected_keys == ["some_new_head.weight"]
    with pytest.raises(RuntimeError, match="itm_head.bias"):
        load_official_checkpoint(MPLUG(config), state, strict=True)


def test_two_way_model_reports_its_vision_layers_missing():
    """The paper's two-way co-attention baseline has vision-side layers no official checkpoint holds."""
    config = MPLUGConfig.tiny(fusion="two_way")
    state, _ = official_state_dict(config)
    result = load_official_checkpoint(MPLUG(config), state)
    assert result.missing_keys and all(key.startswith(("fusion_encoder.vision_encoder.", "mlm_head.")) for key in result.missing_keys)
    assert any(key.startswith("fusion_encoder.vision_encoder.layer.3.") for key in result.missing_keys)


def test_not_a_checkpoint_is_a_type_error():
    with pytest.raises(TypeError, match="path or a dict"):
        load_official_checkpoint(MPLUG(MPLUGConfig.tiny()), [1, 2, 3])


def inputs(pairs=False, seed=4):
    """Random images (pairs [B, 2, 3, H, W] for NLVR2) and texts [B, L] of the tiny config, the second row padded."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((2, 2, 3, 32, 32) if pairs else (2, 3, 32, 32), generator=generator)
    ids = torch.randint(104, 200, (2, 7), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return images, ids, mask


def authors_head(state, hidden):
    """The authors' cls_head (Linear, ReLU, Linear) with the file's values, applied to hidden [B, width]."""
    first = F.linear(hidden, state["cls_head.0.weight"], state["cls_head.0.bias"])
    return F.linear(F.relu(first), state["cls_head.2.weight"], state["cls_head.2.bias"])


@pytest.mark.parametrize("layout", ["ve", "nlvr"])
@pytest.mark.parametrize("momentum", [True, False], ids=["distilled", "plain"])
def test_authors_classifier_files_load_strictly(layout, momentum):
    config = MPLUGConfig.tiny()
    model = MPLUG(config).add_momentum_copies() if momentum else MPLUG(config)
    shapes, ours = authors_layout(config, layout, momentum)
    state = random_state(shapes, seed=2)
    result = load_official_checkpoint(model, state, strict=True, task=layout)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sorted(result.ignored_keys) == sorted(key for key, mapped in ours.items() if mapped is None)
    assert_loaded(model, state, ours)
    with pytest.raises(RuntimeError, match="missing keys.*text_decoder"):
        load_official_checkpoint(MPLUG(config), state, strict=True, task="vqa")


@pytest.mark.parametrize("layout", ["ve", "nlvr"])
def test_loaded_classifier_predicts_with_the_authors_head(layout):
    config = MPLUGConfig.tiny()
    model = MPLUG(config).eval()
    state = random_state(authors_layout(config, layout, momentum=False)[0], seed=10)
    load_official_checkpoint(model, state, strict=True, task=layout)
    pairs = layout == "nlvr"
    images, ids, mask = inputs(pairs)
    with torch.no_grad():
        if pairs:
            fused = torch.cat([fused_cls(model, images[:, n], ids, mask) for n in range(2)], dim=-1)
            predicted, head = model.nlvr_predict(images, ids, mask), model.nlvr_head
        else:
            fused = fused_cls(model, images, ids, mask)
            predicted, head = model.ve_predict(images, ids, mask), model.ve_head
        expected = authors_head(state, fused)
        torch.testing.assert_close(head(fused), expected)
    assert torch.equal(predicted, expected.argmax(-1))


@pytest.mark.parametrize("layout", ["ve", "nlvr"])
def test_classifier_file_reports_missing_and_unexpected_keys(layout):
    config = MPLUGConfig.tiny()
    shapes, _ = authors_layout(config, layout, momentum=False)
    state = random_state(shapes, seed=5)
    del state["cls_head.2.bias"]
    state["cls_head.4.weight"] = torch.randn(2, 2)
    head = {"ve": "ve_head", "nlvr": "nlvr_head"}[layout]
    result = load_official_checkpoint(MPLUG(config), state, task=layout)
    assert result.missing_keys == [f"{head}.2.bias"] and result.unexpected_keys == ["cls_head.4.weight"]
    model = MPLUG(config)
    with pytest.raises(RuntimeError, match=f"{head}.2.bias"):
        load_official_checkpoint(model, state, strict=True, task=layout)
    assert not hasattr(model, "ve_head") and not hasattr(model, "nlvr_head")  # heads added by the load are removed again
    with pytest.raises(RuntimeError, match="unexpected keys.*cls_head.0.weight"):
        load_official_checkpoint(MPLUG(config), state, strict=True)  # the pretrained layout has no classifier


@pytest.mark.parametrize("layout, key, shape, ours", [
    ("nlvr", "cls_head.0.weight", (64, 64), "nlvr_head.0.weight: checkpoint (64, 64), model (128, 128) (nlvr_head reads"),
    ("ve", "cls_head.2.weight", (2, 64), "ve_head.2.weight: checkpoint (2, 64), model (3, 64)"),
], ids=["albef_single_cls_nlvr_head", "two_class_ve_head"])
def test_classifier_head_shape_mismatch_names_key_and_both_shapes(layout, key, shape, ours):
    config = MPLUGConfig.tiny()
    shapes, _ = authors_layout(config, layout, momentum=False)
    state = random_state(shapes, seed=6)
    state[key] = torch.randn(shape)
    model = MPLUG(config)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="shapes do not fit") as error:
        load_official_checkpoint(model, state, task=layout)
    assert f"{key} -> {ours}" in str(error.value)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def grounding_state(config, first_id=120, seed=3):
    """A random file in the authors' grounding layout whose prefix / coordinate tokens are ids first_id,
    first_id + 1, ... (the authors' are 344 = [unused339], 345.. = [unused340]..; the tiny vocabulary has 200)."""
    shapes, ours = authors_layout(config, "grounding", momentum=False)
    state = random_state(shapes, seed=seed)
    levels = grounding_tokens(config).levels
    state["prefix_ids"] = torch.tensor([first_id])
    state["target_ids"] = torch.arange(first_id + 1, first_id + 1 + levels)
    state["bbox_prob_mask"] = torch.full((config.vocab_size,), -10000.0)
    state["bbox_prob_mask"][first_id + 1:first_id + 1 + levels] = 0
    return state, ours


def test_authors_grounding_file_loads_strictly_with_its_coordinate_rows_moved():
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    state, ours = grounding_state(config)
    original = {key: value.clone() for key, value in state.items()}
    result = load_official_checkpoint(model, state, strict=True, task="grounding")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sorted(result.ignored_keys) == sorted(key for key, mapped in ours.items() if mapped is None)
    assert {"prefix_ids", "target_ids", "bbox_prob_mask"} <= set(result.ignored_keys)
    tokens = grounding_tokens(config)
    our_rows = torch.cat([torch.tensor([tokens.prefix]), torch.arange(tokens.levels) + tokens.first_coordinate])
    their_rows = torch.cat([state["prefix_ids"], state["target_ids"]])
    assert bool((our_rows != their_rows).all()) and len(set(our_rows.tolist()) & set(their_rows.tolist())) > 0  # moved, overlapping
    vocabulary = {"text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight",
                  "text_decoder.cls.predictions.bias"}
    expected = {}
    for key in vocabulary:
        expected[key] = state[key].clone()
        expected[key][our_rows] = state[key][their_rows]
    assert_loaded(model, state, {key: mapped for key, mapped in ours.items() if key not in vocabulary})
    for key in vocabulary:
        torch.testing.assert_close(model.state_dict()[key], expected[key], atol=0, rtol=0, msg=lambda m: f"{key}: {m}")
    assert all(torch.equal(state[key], original[key]) for key in state)  # the file's tensors are not modified


def authors_ground(model, images, ids, mask, prefix_id, target_ids):
    """The authors' grounding decode on a model whose decoder keeps the file's rows: prefix_ids alone (no [CLS],
    mPLUG/models/model_grounding_mplug.py:138,166-177), then 4 greedy steps over the file's coordinate tokens;
    (boxes [B, 4], the last step's coordinate logits)."""
    memory, memory_masks = _fused_memory(model, images, ids, mask)
    decoded = torch.tensor([prefix_id]).expand(ids.shape[0], 1)
    for _ in range(4):
        all_ones = torch.ones(decoded.shape, dtype=torch.bool)
        logits = model.text_decoder(decoded, all_ones, memory=memory, memory_masks=memory_masks)[:, -1][:, target_ids]
        decoded = torch.cat([decoded, target_ids[logits.argmax(-1)][:, None]], dim=1)
    return (decoded[:, 1:] - target_ids[0]).float() / model.config.image_size, logits


def test_loaded_grounding_model_decodes_the_authors_coordinate_tokens():
    """ground() on the loaded model (our token ids) gives the boxes the file's own tokens give on an unmoved copy."""
    config = MPLUGConfig.tiny()
    state, _ = grounding_state(config, first_id=150, seed=7)
    ours, unmoved = MPLUG(config).eval(), MPLUG(config).eval()
    load_official_checkpoint(ours, state, strict=True, task="grounding")
    assert sorted(load_official_checkpoint(unmoved, state, task="vqa").unexpected_keys) == ["bbox_prob_mask", "prefix_ids", "target_ids"]
    images, ids, mask = inputs(seed=8)
    tokens = grounding_tokens(config)
    with torch.no_grad():
        expected_boxes, expected_logits = authors_ground(unmoved, images, ids, mask, 150, state["target_ids"])
        memory, memory_masks = _fused_memory(ours, images, ids, mask)
        levels = (expected_boxes[:, :3] * config.image_size).round().long()
        prompt = torch.tensor([[tokens.prefix]] * 2)
        decoded = torch.cat([prompt, levels + tokens.first_coordinate], dim=1)  # the same box in our token ids
        torch.testing.assert_close(_coordinate_logits(ours, decoded, memory, memory_masks)[:, -1], expected_logits)
    assert torch.equal(ours.ground(images, ids, mask), expected_boxes)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("prefix_ids"), "prefix_ids buffer .*no such key"),
    (lambda state: state.update(target_ids=state["target_ids"][:-1]), r"target_ids: the file has 1 prefix and 32 coordinate tokens \(image_res 31 \+ 1 levels\); the model needs 1 and 33"),
    (lambda state: state.update(target_ids=state["target_ids"].float()), "target_ids buffer"),
    (lambda state: state.update(prefix_ids=torch.tensor([200])), r"outside the vocabulary \[0, 200\)"),
    (lambda state: state.update({"text_decoder.bert.embeddings.word_embeddings.weight": torch.randn(234, 64)}),
     r"text_decoder.bert.embeddings.word_embeddings.weight -> text_decoder.bert.embeddings.word_embeddings.weight: checkpoint \(234, 64\), model \(200, 64\)"),
], ids=["no_prefix_buffer", "other_image_res", "float_ids", "id_outside_vocabulary", "vocabulary_with_added_rows"])
def test_grounding_file_errors_name_the_buffer_or_key(change, message):
    config = MPLUGConfig.tiny()
    state, _ = grounding_state(config)
    change(state)
    model = MPLUG(config)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_official_checkpoint(model, state, task="grounding")
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_pretrained_file_does_not_expect_classifier_heads():
    config = MPLUGConfig.tiny()
    model = MPLUG(config).add_classifier_heads()
    shapes, _ = authors_layout(config, "pretrained", momentum=False)
    result = load_official_checkpoint(model, random_state(shapes, seed=9), strict=True)
    assert result.missing_keys == []
