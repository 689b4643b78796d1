"""The denoisers (unet.py, docs/T2DIFF.md §7-8): the 1-D U-Net's geometry and padding, its blocks and FiLM,
the step embedding, the next-slot query row and the knobs that reach them.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.unet import Denoiser, UNet1d, unet_geometry

from helpers import REPO, make_model


def test_geometry_of_the_official_setting():
    geometry = unet_geometry(50, 4)
    assert geometry.padded_length == 50 and geometry.mirror == 22
    assert geometry.crops == (20, 8, 2, 0)


@pytest.mark.parametrize("length", [1, 5, 12, 50, 51, 100, 200])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_valid_geometry_fits_any_length(length, levels):
    geometry = unet_geometry(length, levels)
    stride = 2 ** (levels - 1)
    assert (geometry.padded_length - 2) % stride == 0
    assert geometry.padded_length >= max(length, geometry.mirror)
    assert geometry.padded_length - stride < max(length, geometry.mirror)  # the smallest such length


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("length,levels", [(50, 4), (100, 4), (200, 4), (12, 2), (7, 3), (3, 1), (1, 4)])
def test_unet_keeps_the_sequence_length(padding, length, levels):
    net = UNet1d(6, [3 * 2**i for i in range(levels)], padding)
    assert net(torch.randn(2, length, 6)).shape == (2, length, 3)


def test_output_projection_allows_a_wider_first_level():
    net = UNet1d(8, [8, 16], "valid", out_channels=4)
    assert net(torch.randn(3, 20, 8)).shape == (3, 20, 4)


def test_unknown_padding_is_rejected():
    with pytest.raises(UsageError, match="unet_padding"):
        unet_geometry(50, 4, "reflect")


@pytest.mark.parametrize("step_emb", ["official", "sinusoidal_mlp"])
def test_denoiser_depends_on_the_step(step_emb):
    torch.manual_seed(0)
    denoiser = Denoiser(4, n_steps=10, levels=2, mult=[1, 2], step_emb=step_emb)
    z, x = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    early, late = denoiser(z, x, torch.tensor([1, 1])), denoiser(z, x, torch.tensor([10, 10]))
    assert early.shape == (2, 9, 4)
    assert not torch.allclose(early, late)


def test_unet_parameter_count_at_d64_is_about_the_spec():
    denoiser = Denoiser(64, n_steps=50)
    n = sum(p.numel() for p in denoiser.parameters())
    assert 1.0e6 < n < 1.4e6  # docs/T2DIFF.md §8: about 1.2 M at d = 64


def test_valid_padding_mirrors_the_edge_rows_as_numpy_symmetric():
    net = UNet1d(3, [4, 8], "valid")
    u = torch.randn(2, 5, 3)
    seen = []
    net.down[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    net(u)
    geometry = unet_geometry(5, 2, "valid")
    left_padded = np.pad(u.transpose(1, 2).numpy(), ((0, 0), (0, 0), (geometry.padded_length - 5, 0)))
    expected = np.pad(left_padded, ((0, 0), (0, 0), (geometry.mirror, geometry.mirror)), mode="symmetric")
    assert geometry.mirror > 1
    np.testing.assert_allclose(seen[0].transpose(1, 2).numpy(), expected, rtol=0, atol=0)  # the U-Net reads rows, [B, L, C]


def test_film_scales_and_shifts_every_channel_by_the_condition():
    film = torch.nn.Linear(2, 6)
    x, condition = torch.randn(4, 7, 3), torch.randn(4, 2)  # rows: [B, L, C]
    gamma, beta = film(condition)[:, None, :3], film(condition)[:, None, 3:]
    torch.testing.assert_close(UNet1d._modulate(x, film, condition), x * (1 + gamma) + beta)
    assert UNet1d._modulate(x, None, condition) is x


def test_same_padding_rounds_up_to_the_stride_and_mirrors_nothing():
    as_tuple = lambda g: (g.padded_length, g.mirror, g.crops)
    assert as_tuple(unet_geometry(5, 3, "same")) == (8, 0, (0, 0, 0))
    assert as_tuple(unet_geometry(8, 3, "same")) == (8, 0, (0, 0, 0))
    assert as_tuple(unet_geometry(9, 2, "same")) == (10, 0, (0, 0))


def test_the_sinusoidal_step_table_is_sin_then_cos_at_geometric_frequencies():
    from recbole_t2diff.model.unet import step_table

    for width in (6, 7):
        table, half = step_table("sinusoidal_mlp", 5, width).double(), width // 2
        s = torch.arange(6, dtype=torch.float64)[:, None]
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        expected = torch.cat([torch.sin(s * freqs), torch.cos(s * freqs), torch.zeros(6, width - 2 * half, dtype=torch.float64)], 1)
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    official = step_table("official", 5, 4).double()
    torch.testing.assert_close(official, torch.sin(torch.arange(6.0)[:, None] / 2.0 ** torch.arange(4.0)).double(), rtol=0, atol=1e-6)


def test_the_denoisers_knobs_reach_its_parts_and_its_defaults_are_the_property_files():
    import os

    import yaml

    from recbole_t2diff.model.unet import step_table

    knobs = yaml.safe_load(open(os.path.join(REPO, "properties", "model", "T2Diff.yaml")))
    default = Denoiser(8, 10)
    assert (default.unet.levels, default.unet.out_proj, default.step_scale, default.film, default.slot) == (
        knobs["unet_levels"],
        None,
        knobs["step_emb_scale"],
        False,
        None,
    )
    torch.testing.assert_close(default.steps, step_table("official", 10, 16))
    assert "steps" not in default.state_dict()  # derived from the knobs; checkpoints carry only the learned weights
    assert {m.eps for m in default.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-8}
    mlp = Denoiser(8, 10, levels=2, out_proj=True, step_emb="sinusoidal_mlp", eps=1e-6)
    assert [type(m) for m in mlp.step_mlp] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear] and mlp.step_scale == 1.0
    assert mlp.unet.out_proj is not None and {m.eps for m in mlp.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    torch.testing.assert_close(mlp.steps, step_table("sinusoidal_mlp", 10, 16))


def test_every_unet_block_is_conv_silu_layernorm_and_the_defaults_are_the_property_files():
    from recbole_t2diff.model.unet import RowConv, RowUpsample

    net = UNet1d(6, [4, 8])
    for block in [*net.down, *net.merge]:
        assert [type(m) for m in block] == [RowConv, torch.nn.SiLU, torch.nn.LayerNorm] and block[2].eps == 1e-8
    assert net.down[0][0].padding == (0,) and net.padding == "valid"  # valid convs, mirror padding outside
    assert [type(m) for m in net.up[0]] == [RowUpsample, RowConv, torch.nn.SiLU]
    assert isinstance(net.down[0][0], torch.nn.Conv1d) and net.down[0][0].weight.shape == (4, 6, 3)  # a Conv1d's parameters: checkpoints load
    film = UNet1d(6, [4, 8, 16], film_dim=5)  # FiLM on every down block and every merge, each sized for its level
    assert [layer.out_features for layer in film.film_down] == [8, 16, 32]
    assert [layer.out_features for layer in film.film_merge] == [8, 16]


def test_a_film_t2diff_starts_with_every_film_map_at_zero(tiny_data):
    """T2Diff re-initialises every Linear; the FiLM maps must come back to zero, or the untrained U-Net is modulated at random."""
    unet = make_model(tiny_data, step_conditioning="film").denoiser.unet
    maps = [*unet.film_down, *unet.film_merge]
    assert maps and all(layer.weight.abs().max().item() == 0 and layer.bias.abs().max().item() == 0 for layer in maps)


# ---- the denoiser's input rows and step conditioning -------------------------------------------------


def test_next_slot_puts_the_next_items_drift_on_a_learned_query_row():
    torch.manual_seed(0)
    denoiser = Denoiser(4, n_steps=10, levels=2, mult=[1, 2], next_slot=True)
    with torch.no_grad():
        denoiser.slot.copy_(torch.arange(1.0, 5.0))
    seen = []
    unet = denoiser.unet.forward
    denoiser.unet.forward = lambda u, *rest, **options: seen.append(u) or unet(u, *rest, **options)
    z_s, condition = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    out = denoiser(z_s, condition, torch.tensor([1, 5, 10]))
    u = seen[0] - denoiser.step_scale * denoiser.steps[torch.tensor([1, 5, 10])][:, None, :]
    assert out.shape == (3, 6, 4) and u.shape == (3, 7, 8)
    # drift j sits on the row of the item it leads to; the last row's condition is the query, not x_L
    torch.testing.assert_close(u[:, 1:, :4], z_s)
    torch.testing.assert_close(u[:, 0, :4], torch.zeros(3, 4))
    torch.testing.assert_close(u[:, :6, 4:], condition)
    torch.testing.assert_close(u[:, 6, 4:], torch.arange(1.0, 5.0).expand(3, 4))


def test_the_official_layout_reads_the_last_drift_off_a_mirrored_edge():
    """Why the slot exists: without it the U-Net's input ends at x_L, so a neighbour-difference filter reads 0 there."""
    torch.manual_seed(0)
    plain = Denoiser(4, n_steps=10, levels=2, mult=[1, 2])
    seen = []
    unet = plain.unet.forward
    plain.unet.forward = lambda u, *rest, **options: seen.append(u) or unet(u, *rest, **options)
    condition = torch.randn(2, 6, 4)
    plain(torch.randn(2, 6, 4), condition, torch.tensor([3, 3]))
    assert seen[0].shape == (2, 6, 8)
    torch.testing.assert_close(seen[0][:, -1, 4:] - plain.step_scale * plain.steps[3][4:], condition[:, -1])


@pytest.mark.parametrize("step_emb", ["official", "sinusoidal_mlp"])
def test_film_conditions_every_level_on_the_step_and_starts_as_the_plain_unet(step_emb):
    torch.manual_seed(0)
    film = Denoiser(4, n_steps=10, levels=2, mult=[1, 2], step_emb=step_emb, step_conditioning="film")
    z_s, condition = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    # zero-initialised FiLM maps: at first the step changes nothing and no step is added to the input
    plain = film.unet(torch.cat([z_s, condition], -1), torch.zeros(2, 8))
    torch.testing.assert_close(film(z_s, condition, torch.tensor([2, 2])), plain)
    torch.testing.assert_close(film(z_s, condition, torch.tensor([9, 9])), plain)
    for layer in [*film.unet.film_down, *film.unet.film_merge]:
        torch.nn.init.normal_(layer.weight, std=0.5)
    early, late = film(z_s, condition, torch.tensor([1, 1])), film(z_s, condition, torch.tensor([9, 9]))
    assert (early - late).abs().mean() > 0.05
    # every level is modulated: zeroing one level's map changes the output
    for layer in [film.unet.film_down[1], film.unet.film_merge[0]]:
        saved = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.zero_()
        assert not torch.allclose(film(z_s, condition, torch.tensor([9, 9])), late)
        with torch.no_grad():
            layer.weight.copy_(saved)


# ---- computing only the rows that are read ---------------------------------------------------------


def whole_sequence_unet(net, u, condition=None):
    """The U-Net as docs/T2DIFF.md §8 states it, written out plainly on [B, C, L] tensors with torch's functions
    and the net's parameters (not its channels-last modules): every row of every level, the convolutions padded by
    themselves, skips cropped on both sides, the last L rows kept."""
    length, pad = u.size(1), net.conv_pad
    geometry = unet_geometry(length, net.levels, net.padding)
    x = F.pad(u.transpose(1, 2), (geometry.padded_length - length, 0))
    if geometry.mirror:
        m = geometry.mirror
        x = torch.cat([x[..., :m].flip(-1), x, x[..., -m:].flip(-1)], dim=-1)

    def block(layers, x):
        x, norm = F.silu(F.conv1d(x, layers[0].weight, layers[0].bias, padding=pad)), layers[2]
        return F.layer_norm(x.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)

    def up(layers, x):
        return F.silu(F.conv1d(F.interpolate(x, scale_factor=2, mode="nearest"), layers[1].weight, layers[1].bias))

    def modulate(x, film):
        if film is None:
            return x
        gamma, beta = film(condition).unsqueeze(-1).chunk(2, dim=1)
        return x * (1.0 + gamma) + beta

    skips = []
    for i in range(net.levels):
        x = modulate(block(net.down[i], x if i == 0 else F.max_pool1d(x, 2)), net.film_down and net.film_down[i])
        skips.append(x)
    for i in reversed(range(net.levels - 1)):
        crop = geometry.crops[i]
        skip = skips[i][..., crop : skips[i].size(-1) - crop]
        x = modulate(block(net.merge[i], torch.cat([up(net.up[i], x), skip], dim=1)), net.film_merge and net.film_merge[i])
    if net.out_proj is not None:
        x = F.conv1d(x, net.out_proj.weight, net.out_proj.bias)
    return x[..., -length:].transpose(1, 2)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [3, 10, 11, 50])
def test_the_last_rows_alone_are_the_whole_sequences_last_rows(padding, levels, length):
    torch.manual_seed(levels * 100 + length)
    film = levels % 2 == 0
    net = UNet1d(6, [8 * 2**i for i in range(levels)], padding, out_channels=5 if levels == 3 else None, film_dim=4 if film else None)
    if film:  # FiLM maps start at 0; give them something to do
        for layer in [*net.film_down, *net.film_merge]:
            torch.nn.init.normal_(layer.weight)
    u, condition = torch.randn(3, length, 6), torch.randn(3, 4) if film else None
    with torch.no_grad():
        whole = whole_sequence_unet(net, u, condition)
        # Every row computed, in the channels-last layout (and for "same" padded by the U-Net, not the convolution):
        # the plain U-Net's function up to rounding.
        torch.testing.assert_close(net(u, condition), whole, rtol=1e-5, atol=1e-6)
        for rows in sorted({1, 2, length}):
            torch.testing.assert_close(net(u, condition, rows=rows), whole[:, -rows:], rtol=1e-5, atol=1e-6)
            # One sequence alone (serving one user) goes through RowConv's matmul instead of the convolution: its
            # sums run in another order, and the norms after them scale the rounding up to a few 1e-6.
            one = net(u[:1], None if condition is None else condition[:1], rows=rows)
            torch.testing.assert_close(one, whole[:1, -rows:], rtol=1e-5, atol=1e-5)


def test_the_last_row_of_the_official_unet_reads_a_quarter_of_its_rows():
    """docs/T2DIFF.md §8: at 4 levels over 50 rows the last row's cone is 44, 20, 8, 2 rows of the down
    path (of 92, 44, 20, 8) and 2, 2, 1 of the merges (of 14, 26, 50)."""
    net = UNet1d(4, [4, 8, 16, 32])
    widths = {}
    for name, layers in [("down", net.down), ("merge", net.merge)]:
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda module, args, out, key=(name, i): widths.setdefault(key, []).append(out.size(1)))
    with torch.no_grad():
        net(torch.randn(2, 50, 4))
        net(torch.randn(2, 50, 4), rows=1)
    assert [widths[("down", i)] for i in range(4)] == [[92, 44], [44, 20], [20, 8], [8, 2]]
    assert [widths[("merge", i)] for i in range(3)] == [[50, 1], [26, 2], [14, 2]]


@pytest.mark.parametrize("knobs", [{}, {"diffusion_scale": "rms", "train_xhat": "chain"}])
def test_recboles_enable_amp_runs_the_unet_in_bfloat16_and_keeps_the_losses_float32(tiny_data, knobs):
    """RecBole's ``enable_amp`` wraps a training step's calculate_loss in torch.autocast, bfloat16 on a CPU: the U-Net's
    convolutions then run in bfloat16 (2.1x a published T2Diff step on an AMX CPU, docs/T2DIFF.md §8), and the losses
    and the model's state stay float32 and close to the float32 step's."""
    from helpers import QUIET, first_batch, make_model

    batch = first_batch(tiny_data[1])
    reference, model = make_model(tiny_data, **knobs, **QUIET), make_model(tiny_data, **knobs, **QUIET)
    convolutions = []
    model.denoiser.unet.down[0][0].register_forward_hook(lambda module, args, out: convolutions.append(out.dtype))
    reference.train(), model.train()
    torch.manual_seed(3)
    expected = reference.calculate_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        losses = model.calculate_loss(batch)
    sum(losses).backward()
    assert convolutions and set(convolutions) == {torch.bfloat16}  # the chain of train_xhat: chain runs it again
    assert all(loss.dtype == torch.float32 for loss in losses)
    assert all(t.dtype == torch.float32 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for loss, reference_loss in zip(losses, expected):
        torch.testing.assert_close(loss, reference_loss, rtol=0.05, atol=1e-3)
