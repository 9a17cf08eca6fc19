"""SNLI-VE and NLVR2 classifiers over the fused [CLS] on the tiny model: shapes, losses recomputed by hand from the
fusion outputs, one image for NLVR2 refused."""
import pytest
import torch
import torch.nn.functional as F

from mplug import MPLUG, MPLUGConfig
from mplug.tasks.pretraining import encode_images

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval().add_classifier_heads()


def inputs(batch=3, seed=0, images_per_text=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 32, 32) if images_per_text is None else (batch, images_per_text, 3, 32, 32)
    images = torch.randn(*shape, generator=generator, dtype=torch.float64)
    ids = torch.randint(104, 200, (batch, 6), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[0, 4:] = False
    ids[0, 3] = SEP
    return images, ids, mask


def cls_of(model, images, ids, mask, row):
    """The fused [CLS] of one (image, text) pair, alone in its batch."""
    image_embeds, image_mask = encode_images(model, images[row:row + 1])
    text = model.text_encoder(ids[row:row + 1], mask[row:row + 1])
    return model.fusion_encoder(image_embeds, image_mask, text, mask[row:row + 1])[1][0, 0]


def mlp(head, x):
    """Linear, ReLU, Linear by hand."""
    hidden = torch.relu(x @ head[0].weight.t() + head[0].bias)
    return hidden @ head[2].weight.t() + head[2].bias


def test_ve_loss_and_predict_by_hand(model):
    images, ids, mask = inputs()
    labels = torch.tensor([0, 2, 1])
    loss = model.ve_loss(images, ids, mask, labels)
    logits = torch.stack([mlp(model.ve_head, cls_of(model, images, ids, mask, b)) for b in range(3)])
    assert logits.shape == (3, 3)
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    expected = -(log_probs[0, 0] + log_probs[1, 2] + log_probs[2, 1]) / 3
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert model.ve_predict(images, ids, mask).tolist() == logits.argmax(-1).tolist()


def test_nlvr_loss_and_predict_by_hand(model):
    pairs, ids, mask = inputs(images_per_text=2, seed=1)
    labels = torch.tensor([1, 0, 1])
    loss = model.nlvr_loss(pairs, ids, mask, labels)
    logits = []
    for b in range(3):
        left = cls_of(model, pairs[:, 0], ids, mask, b)
        right = cls_of(model, pairs[:, 1], ids, mask, b)
        logits.append(mlp(model.nlvr_head, torch.cat([left, right])))
    logits = torch.stack(logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels).float(), rtol=1e-5, atol=1e-6)
    assert model.nlvr_predict(pairs, ids, mask).tolist() == logits.argmax(-1).tolist()


def test_heads_train(model):
    images, ids, mask = inputs(seed=2)
    model.zero_grad()
    model.ve_loss(images, ids, mask, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ve_head.parameters())
    assert model.nlvr_head[0].weight.shape == (2 * model.config.hidden_size, 2 * model.config.hidden_size)
    model.zero_grad()


def test_bad_inputs_are_rejected(model):
    images, ids, mask = inputs()
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 2, 3, H, W\]"):
        model.nlvr_loss(images, ids, mask, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 2, 3, H, W\]"):
        model.nlvr_predict(images[:, None], ids, mask)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        model.ve_loss(images, ids, mask, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"labels must be a long tensor \[B\] = \[3\]"):
        model.ve_loss(images, ids, mask, torch.tensor([0.0, 1.0, 1.0]))
