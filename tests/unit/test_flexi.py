"""Low-resolution scoring (Flexi-JEST style): positional embeddings resized only inside the block."""
import pytest
import torch

from pipeline.flexi import _resized_pos_embed, at_resolution
from pipeline.models import create_model


def test_lowres_forward_runs_and_restores_the_parameter_in_place():
    model = create_model("aced-vit-t", seed=0).model
    before = [name for name, _ in model.named_parameters()]
    original = model.visual.positional_embedding
    with torch.inference_mode(), at_resolution(model, 32):
        out = model.encode_image(torch.randn(3, 3, 32, 32), normalize=True)
    assert out.shape[0] == 3 and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.visual.positional_embedding is original  # same object, unchanged, same position
    assert [name for name, _ in model.named_parameters()] == before
    with pytest.raises(RuntimeError):  # outside the block the tower is back to its native resolution
        model.encode_image(torch.randn(1, 3, 32, 32))


def test_resize_keeps_class_token_and_is_identity_at_native_grid():
    pos = torch.randn(1 + 8 * 8, 16)
    assert _resized_pos_embed(pos, 8) is pos
    small = _resized_pos_embed(pos, 4)
    assert small.shape == (1 + 16, 16) and torch.equal(small[0], pos[0])


def test_resolution_must_be_a_multiple_of_the_patch():
    model = create_model("aced-vit-t", seed=0).model
    with pytest.raises(ValueError, match="multiple of the patch"):
        with at_resolution(model, 30):
            pass


def test_scoring_forward_runs_in_eval_mode_gives_train_mode_embeddings_and_restores_mode():
    import numpy as np

    from pipeline.data import SuperBatch
    from pipeline.trainer import embed, score_superbatch

    bundle = create_model("aced-vit-t", seed=0)
    model = bundle.model.train()
    seen = []
    hook = model.visual.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    torch.manual_seed(0)
    sb = SuperBatch(step=0, images=torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8),
                    tokens=bundle.tokenizer(["a red circle."] * 7), uids=np.arange(7).astype(str).astype(object),
                    noisy=torch.zeros(7, dtype=torch.bool), reference=None, teachers=[])
    img, txt = score_superbatch(bundle, sb, resolution=None, chunk=3)
    hook.remove()
    assert seen == [False, False, False] and model.training  # eval while scoring, train mode after
    with torch.no_grad():
        ref_img, ref_txt = embed(model, bundle.normalize(sb.images), sb.tokens)  # the training forward
    assert torch.allclose(img, ref_img, atol=1e-5) and torch.allclose(txt, ref_txt, atol=1e-5)
