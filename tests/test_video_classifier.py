"""VideoClassifier against its torch.nn build (``to_torch_nn``: ``nn.LSTM`` fed a ``PackedSequence``
where fastseq takes ``lengths=``, ``nn.TransformerEncoder`` with the same key-padding mask), padded
clips against each clip alone, and its refusals of bad input."""

import pytest
import torch
from tolerance import assert_within_rule

from fastseq.models import VideoClassifier, VideoClassifierConfig
from fastseq.nn import to_torch_nn

pytestmark = pytest.mark.filterwarnings("ignore:.*(nested_tensor|mismatched).*:UserWarning")

LENGTHS = torch.tensor([6, 3, 1])


def _model(name):
    """``"<frame encoder>-<temporal>-<pooling>"``, small; the LSTM bidirectional and two layers deep."""
    frame_encoder, temporal, pooling = name.split("-")
    torch.manual_seed(0)
    return VideoClassifier(VideoClassifierConfig(
        num_classes=5, image_size=8, in_chans=2, frame_encoder=frame_encoder, cnn_channels=(4, 6),
        patch_size=4, encoder_depth=1, encoder_heads=2, embed_dim=12, temporal=temporal, hidden_size=10,
        num_layers=2, bidirectional=True, num_heads=2, dim_feedforward=16, max_frames=8, pooling=pooling))


def _clips(batch=3, frames=6):
    return torch.randn(batch, frames, 2, 8, 8, generator=torch.Generator().manual_seed(1))


NAMES = ["cnn-lstm-last", "cnn-lstm-mean", "cnn-lstm-max", "cnn-transformer-last", "cnn-transformer-max",
         "vit-lstm-mean", "vit-transformer-mean"]


@pytest.mark.parametrize("lengths", [LENGTHS, None], ids=["lengths", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_gradients_match_the_torch_nn_build(name, lengths):
    ours = _model(name)
    low = to_torch_nn(ours)
    truth = to_torch_nn(ours).double()
    assert not any("fastseq.nn" in type(m).__module__ for m in low.modules())
    clips = _clips()
    results = []
    for model in (truth, low, ours):
        model.zero_grad()
        x = clips.to(next(model.parameters()).dtype).requires_grad_()
        out = model(x, lengths)
        out.backward(torch.ones_like(out) / out.numel() + out.detach() * 0.01)
        results.append((out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (t_out, t_x, t_grads), (l_out, l_x, l_grads), (out, x_grad, grads) = results
    assert_within_rule(out, t_out, l_out, "logits")
    assert_within_rule(x_grad, t_x, l_x, "clips.grad", factor=3.0)
    if lengths is not None:  # nothing of a padded frame reaches the logits
        assert x_grad[1, 3:].abs().max() == 0 and x_grad[2, 1:].abs().max() == 0
    for param, grad in grads.items():
        assert grad is not None, param
        assert_within_rule(grad, t_grads[param], l_grads[param], param, factor=3.0)


@pytest.mark.parametrize("name", ["cnn-lstm-last", "cnn-lstm-max", "cnn-transformer-mean"])
def test_a_padded_batch_gives_each_clip_its_own_logits(name):
    model = _model(name).eval()
    clips = _clips()
    clips[1, 3:] = clips[2, 1:] = 1e3  # whatever the padding holds
    with torch.no_grad():
        batched = model(clips, LENGTHS)
        for row, length in enumerate(LENGTHS.tolist()):
            torch.testing.assert_close(batched[row:row + 1], model(clips[row:row + 1, :length]),
                                       atol=1e-5, rtol=1e-4)
        # torch.nn's inference fast path (nested tensors off, as configured) agrees too
        torch.testing.assert_close(to_torch_nn(model)(clips, LENGTHS), batched, atol=1e-5, rtol=1e-4)


def test_last_pooling_of_a_bidirectional_lstm_reads_each_directions_final_state():
    model = _model("cnn-lstm-last").eval()
    twin = to_torch_nn(model)
    clips = _clips()
    with torch.no_grad():
        frames = twin.embed_frames(clips)
        packed = torch.nn.utils.rnn.pack_padded_sequence(frames, LENGTHS, batch_first=True,
                                                         enforce_sorted=False)
        _, (h_n, _) = twin.temporal.lstm(packed)
        expected = twin.head(torch.cat([h_n[-2], h_n[-1]], 1))  # the last layer's two directions
        torch.testing.assert_close(model(clips, LENGTHS), expected, atol=1e-5, rtol=1e-4)


def test_bad_input_is_refused_by_name():
    model = _model("cnn-transformer-last")
    clips = _clips()
    with pytest.raises(ValueError, match=r"VideoClassifier: clips must be a floating-point \(B, T, 2, 8, 8\) "
                                         r"tensor, got torch.float32 \(18, 2, 8, 8\)"):
        model(clips.flatten(0, 1))
    with pytest.raises(ValueError, match=r"clips must be .* got torch.float32 \(3, 6, 1, 8, 8\)"):
        model(clips[:, :, :1])
    with pytest.raises(ValueError, match=r"clips must be .* got torch.float32 \(3, 6, 2, 4, 4\)"):
        model(clips[..., :4, :4])
    with pytest.raises(ValueError, match=r"clips must be a floating-point .* got torch.int64"):
        model(clips.long())
    with pytest.raises(ValueError, match=r"clips have no frames \(T = 0\)"):
        model(clips[:, :0])
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 6\], got 0..6"):
        model(clips, torch.tensor([6, 0, 1]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 6\], got 1..7"):
        model(clips, torch.tensor([7, 3, 1]))
    with pytest.raises(ValueError, match=r"lengths must be a \(3,\) integer tensor"):
        model(clips, torch.tensor([6.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="clips have 9 frames, more than max_frames=8"):
        model(_clips(frames=9))


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="temporal must be one of"):
        VideoClassifierConfig(num_classes=3, temporal="gru")
    with pytest.raises(ValueError, match="frame_encoder must be one of"):
        VideoClassifierConfig(num_classes=3, frame_encoder="resnet")
    with pytest.raises(ValueError, match="pooling must be one of"):
        VideoClassifierConfig(num_classes=3, pooling="first")
    with pytest.raises(ValueError, match=r"image_size \(12\) must be a multiple of .* = 8"):
        VideoClassifierConfig(num_classes=3, image_size=12, cnn_channels=(4, 4, 4))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        VideoClassifierConfig(num_classes=0)
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be a multiple of num_heads \(4\)"):
        VideoClassifierConfig(num_classes=3, embed_dim=10, temporal="transformer")
